"""ptm operator: reconciles PretrainedModel resources into conversion Jobs and GPU serving."""

GROUP = "ptm.dev"
VERSION = "v1alpha1"
PLURAL = "pretrainedmodels"
KIND = "PretrainedModel"
