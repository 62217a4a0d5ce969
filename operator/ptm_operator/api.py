"""The PretrainedModel API: the one resource that describes a served model's whole life.

These pydantic models are the single source of truth for the CRD (`ptm crd` generates the
structural schema and its CEL rules from them, see crdgen.py) and for the operator, which parses
every object it reconciles with `PretrainedModel.from_body()`.

Options that a runtime process interprets (source, conversion, optimization, validation, the
serving runtime) are defined once in `ptm_runtime.options` and composed here; this module only
adds what the operator alone reads (secrets, update policy, replicas, scheduling, rollout,
remediation). No field is declared twice.

Every cross-field rule exists twice on purpose: as a CEL `x-kubernetes-validations` rule, so the
API server rejects a bad manifest with a message naming the field, and as a `model_validator`
with the same message, so the operator and local tools (which have no API server) agree.

Pure: imports neither kopf nor a Kubernetes client.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from ptm_operator import GROUP, KIND, VERSION
from ptm_runtime.options import (
    DURATION_PATTERN,
    ConversionOptions,
    DataRef,
    OptimizationOptions,
    Options,
    Precision,
    RuntimeOptions,
    SourceOptions,
    ValidationOptions,
    cel,
)
from ptm_runtime.report import Metrics

API_VERSION = f"{GROUP}/{VERSION}"

#: Annotation that releases an indefinite rollout pause (`pause: {}`), like `kubectl argo rollouts promote`.
PROMOTE_ANNOTATION = f"{GROUP}/promote"
#: Annotation that rolls the canary back at once (consumed when acted on).
ABORT_ANNOTATION = f"{GROUP}/abort"

#: DNS-1123 subdomain (Secret, claim, class names).
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

#: A Kubernetes resource quantity without a sign ("500m", "2Gi", "1"): requests are never negative.
QUANTITY_PATTERN = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"

#: Source URI schemes (the pattern in SourceOptions.uri says the rest of the shape).
URI_SCHEMES = ("pvc://", "file:///", "s3://", "http://", "https://", "hf://")

#: Revision ids: what the operator derives from the artifact-changing parts of the spec.
REVISION_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"

_M = TypeVar("_M", bound=BaseModel)


def rules_of(model: type[BaseModel]) -> list[tuple[str, str] | tuple[str, str, str]]:
    """The CEL rules a model already carries, so a subclass can add to them instead of replacing them."""
    extra = model.model_config.get("json_schema_extra")
    if not isinstance(extra, dict):
        return []
    found: list[tuple[str, str] | tuple[str, str, str]] = []
    rules = extra.get("x-kubernetes-validations", [])
    assert isinstance(rules, list)
    for item in rules:
        assert isinstance(item, dict)
        if "fieldPath" in item:
            found.append((str(item["rule"]), str(item["message"]), str(item["fieldPath"])))
        else:
            found.append((str(item["rule"]), str(item["message"])))
    return found


def narrow(value: BaseModel, target: type[_M]) -> _M:
    """The `target` part of a composed spec (e.g. the RuntimeOptions of a ServingSpec)."""
    return target.model_validate(value.model_dump(include=set(target.model_fields), by_alias=False))


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("quantities must not be negative")
        return value
    if not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a non-negative quantity such as 500m, 2Gi or 1")
    return value


#: A resource quantity: an integer or a string such as "500m" or "2Gi" (as in Pod resources).
Quantity = Annotated[
    StrictInt | StrictStr,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "maxLength": 64,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]


def duration_seconds(text: str) -> float:
    """Seconds in a duration string ("1h30m", "500ms")."""
    if not re.match(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m or 1h30m")
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, _, u in re.findall(r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)", text))


# --- source --------------------------------------------------------------------------------------


class SecretRef(Options):
    """A Secret in the PretrainedModel's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Name of the Secret."""


class SecretKeyRef(SecretRef):
    """One key of a Secret in the PretrainedModel's namespace."""

    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key within the Secret."""


class UpdatePolicyType(StrEnum):
    MANUAL = "Manual"
    POLL = "Poll"


class UpdatePolicy(Options):
    """When the operator looks for a new checkpoint at the same URI."""

    type: UpdatePolicyType = UpdatePolicyType.MANUAL
    """Manual: the checkpoint is read once per spec change. Poll: the source is re-checked every
    interval and a changed digest starts a new revision (useful for hf:// without @revision,
    s3:// keys that are overwritten, http(s):// with ETags)."""
    interval: Duration = "1h"
    """How often to re-check the source when type is Poll."""


class SourceSpec(SourceOptions):
    """Where the checkpoint is and how to read it (what `ptm convert` reads, plus the operator's
    credentials and update policy)."""

    credentials_secret_ref: SecretRef | None = None
    """For s3:// sources: a Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally
    AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL, passed to the conversion Job as env."""
    token_secret_ref: SecretKeyRef | None = None
    """For hf:// and http(s):// sources: a Secret key holding an access token (HF_TOKEN for
    hf://, a bearer token for http(s)://)."""
    update_policy: UpdatePolicy = Field(default_factory=UpdatePolicy)
    """Whether the operator watches the source for new checkpoints."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            *rules_of(SourceOptions),
            (
                f"{list(URI_SCHEMES)}.exists(p, self.uri.startsWith(p))",
                f"uri scheme must be one of {', '.join(URI_SCHEMES)}",
                ".uri",
            ),
            (
                "!has(self.credentialsSecretRef) || self.uri.startsWith('s3://')",
                "credentialsSecretRef applies to s3:// sources only",
                ".credentialsSecretRef",
            ),
            (
                "!has(self.tokenSecretRef) || self.uri.startsWith('hf://') || self.uri.startsWith('http')",
                "tokenSecretRef applies to hf:// and http(s):// sources only",
                ".tokenSecretRef",
            ),
        )
    )

    @field_validator("uri", mode="before")
    @classmethod
    def _supported_scheme(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.startswith(URI_SCHEMES):
            raise ValueError(f"uri scheme must be one of {', '.join(URI_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _secrets_match_scheme(self) -> Self:
        if self.credentials_secret_ref is not None and not self.uri.startswith("s3://"):
            raise ValueError("credentialsSecretRef applies to s3:// sources only")
        if self.token_secret_ref is not None and not self.uri.startswith(("hf://", "http")):
            raise ValueError("tokenSecretRef applies to hf:// and http(s):// sources only")
        return self

    def source_options(self) -> SourceOptions:
        """What the converter reads (without the operator's secrets and policy)."""
        return narrow(self, SourceOptions)


# --- resources and scheduling ---------------------------------------------------------------------

#: Rules shared by resource maps: no negative numbers, whole GPUs (negative strings fail the pattern).
_RESOURCE_MAP_RULES = cel(
    (
        "self.all(k, type(self[k]) == string || self[k] >= 0)",
        "resource quantities must not be negative",
    ),
    (
        "!('nvidia.com/gpu' in self) || type(self['nvidia.com/gpu']) == int"
        " || self['nvidia.com/gpu'].matches('^[0-9]+$')",
        "nvidia.com/gpu must be a whole, non-negative number of GPUs",
        "['nvidia.com/gpu']",
    ),
)


def _check_resource_map(value: dict[str, int | str]) -> dict[str, int | str]:
    for key, amount in value.items():
        if key == "nvidia.com/gpu" and not (isinstance(amount, int) or re.fullmatch(r"[0-9]+", amount)):
            raise ValueError("nvidia.com/gpu must be a whole, non-negative number of GPUs")
    return value


ResourceMap = Annotated[
    dict[str, Quantity],
    AfterValidator(_check_resource_map),
    Field(max_length=16, json_schema_extra=_RESOURCE_MAP_RULES),
]


def _quantities(**amounts: int | str) -> dict[str, int | str]:
    return dict(amounts)


class ResourceRequirements(Options):
    """Compute resources per serving pod, as in a Pod's container resources."""

    requests: ResourceMap = Field(default_factory=lambda: _quantities(cpu="500m", memory="1Gi"))
    """Resources the scheduler reserves (cpu, memory, nvidia.com/gpu, ...)."""
    limits: ResourceMap = Field(default_factory=lambda: _quantities(memory="2Gi"))
    """Upper bounds; GPUs go here (nvidia.com/gpu: 1), and the memory limit is what an
    OOMKilled remediation raises."""

    def gpus(self, resource: str = "nvidia.com/gpu") -> int:
        """GPUs requested per pod (limits win over requests, as for extended resources)."""
        amount = self.limits.get(resource, self.requests.get(resource, 0))
        return int(amount)


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(Options):
    """A Pod toleration (e.g. for the nvidia.com/gpu:NoSchedule taint on GPU nodes)."""

    key: str | None = Field(default=None, max_length=316)
    """Taint key; empty with operator Exists tolerates everything."""
    operator: TolerationOperator = TolerationOperator.EQUAL
    """Exists or Equal."""
    value: str | None = Field(default=None, max_length=63)
    """Taint value for operator Equal."""
    effect: TaintEffect | None = None
    """Taint effect to tolerate; empty tolerates all effects."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""


class GPUSelector(Options):
    """Node affinity by GPU model and memory (the GPU feature discovery labels
    nvidia.com/gpu.product and nvidia.com/gpu.memory)."""

    products: list[Annotated[str, Field(min_length=1, max_length=63)]] = Field(
        default_factory=list, max_length=16
    )
    """Acceptable GPU products (nvidia.com/gpu.product label values, e.g. NVIDIA-A100-SXM4-40GB)."""
    min_memory_mib: int | None = Field(default=None, ge=1, alias="minMemoryMiB")
    """Smallest acceptable GPU memory in MiB (nvidia.com/gpu.memory label)."""


# --- autoscaling ---------------------------------------------------------------------------------


class AutoscalingMetric(StrEnum):
    CPU = "cpu"
    INFLIGHT_REQUESTS = "inflightRequests"
    QUEUE_DEPTH = "queueDepth"


#: Per-pod targets when `autoscaling.target` is unset.
DEFAULT_AUTOSCALING_TARGETS: dict[AutoscalingMetric, float] = {
    AutoscalingMetric.CPU: 70.0,
    AutoscalingMetric.INFLIGHT_REQUESTS: 8.0,
    AutoscalingMetric.QUEUE_DEPTH: 16.0,
}


class KedaOptions(Options):
    """Scale with KEDA (a ScaledObject with a Prometheus trigger) instead of an HPA; allows
    scaling to zero."""

    prometheus_address: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090", max_length=2048, pattern=r"^https?://.+$"
    )
    """Prometheus that KEDA queries for the metric."""
    polling_interval_seconds: int = Field(default=15, ge=1, le=3600)
    """How often KEDA checks the metric."""
    cooldown_period_seconds: int = Field(default=300, ge=0, le=86400)
    """How long to wait after the last activity before scaling to zero."""


class AutoscalingSpec(Options):
    """Horizontal autoscaling of the serving pods (HPA, or KEDA when `keda` is set)."""

    min_replicas: int = Field(default=1, ge=0, le=1000)
    """Fewest replicas; 0 (scale to zero) needs keda."""
    max_replicas: int = Field(default=4, ge=1, le=1000)
    """Most replicas."""
    metric: AutoscalingMetric = AutoscalingMetric.INFLIGHT_REQUESTS
    """What drives scaling: cpu (utilization), inflightRequests (requests being served per pod)
    or queueDepth (requests waiting in the batching queue per pod)."""
    target: float | None = Field(default=None, gt=0, le=100000)
    """Per-pod target of the metric: percent for cpu (default 70), requests for
    inflightRequests (default 8) and queueDepth (default 16)."""
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600)
    """How long the recommendation must stay lower before replicas are removed."""
    keda: KedaOptions | None = None
    """Use KEDA instead of a HorizontalPodAutoscaler."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.minReplicas <= self.maxReplicas",
                "minReplicas must not exceed maxReplicas",
                ".minReplicas",
            ),
            (
                "self.minReplicas > 0 || has(self.keda)",
                "minReplicas 0 (scale to zero) needs keda",
                ".minReplicas",
            ),
        )
    )

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        if self.min_replicas == 0 and self.keda is None:
            raise ValueError("minReplicas 0 (scale to zero) needs keda")
        return self

    def effective_target(self) -> float:
        return self.target if self.target is not None else DEFAULT_AUTOSCALING_TARGETS[self.metric]


# --- network policy ------------------------------------------------------------------------------


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class SelectorRequirement(Options):
    """A label selector requirement (key, operator, values)."""

    key: str = Field(min_length=1, max_length=316)
    """Label key."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)
    """Values for In and NotIn; empty for Exists and DoesNotExist."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(self.operator in ['In', 'NotIn']) == (size(self.values) > 0)",
                "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist",
                ".values",
            ),
        )
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        if (self.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)) != bool(self.values):
            raise ValueError(
                "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist"
            )
        return self


class LabelSelector(Options):
    """A Kubernetes label selector; empty selects everything."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=32)
    """Labels that must match exactly."""
    match_expressions: list[SelectorRequirement] = Field(default_factory=list, max_length=16)
    """Further requirements, all of which must hold."""


class NetworkPolicyPeer(Options):
    """Who may call: pods matching podSelector in namespaces matching namespaceSelector."""

    namespace_selector: LabelSelector | None = None
    """Namespaces whose pods may call; absent means the model's own namespace."""
    pod_selector: LabelSelector | None = None
    """Pods that may call; absent means all pods of the selected namespaces."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.namespaceSelector) || has(self.podSelector)",
                "a network policy peer needs namespaceSelector or podSelector",
            ),
        )
    )

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.namespace_selector is None and self.pod_selector is None:
            raise ValueError("a network policy peer needs namespaceSelector or podSelector")
        return self


class NetworkPolicySpec(Options):
    """A NetworkPolicy in front of the serving pods: who may call the model."""

    enabled: bool = False
    """Create the NetworkPolicy. Off: the cluster's own policies apply."""
    allow_from: list[NetworkPolicyPeer] = Field(default_factory=list, max_length=16)
    """Callers allowed on the REST and gRPC ports; empty allows only pods in the same
    namespace. Metrics scraping is governed by allowMetricsFrom."""
    allow_metrics_from: list[NetworkPolicyPeer] = Field(default_factory=list, max_length=16)
    """Who may scrape /metrics (e.g. the monitoring namespace); empty allows only pods in the
    same namespace."""


# --- serving -------------------------------------------------------------------------------------


class Protocol(StrEnum):
    REST = "rest"
    GRPC = "grpc"


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class ServingSpec(RuntimeOptions):
    """How the model is served: the runtime options `ptm serve` reads, plus replicas,
    autoscaling, resources, scheduling and network exposure."""

    replicas: int = Field(default=1, ge=0, le=1000)
    """Serving pods when autoscaling is not set (ignored when it is)."""
    autoscaling: AutoscalingSpec | None = None
    """Scale between minReplicas and maxReplicas on a metric instead of a fixed replicas count."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """Per-pod compute resources, including GPUs (limits: {nvidia.com/gpu: 1})."""
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32
    )
    """Node labels the serving pods require."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations of the serving pods. With GPUs requested, the operator adds one for the
    nvidia.com/gpu:NoSchedule taint unless an equivalent is present."""
    affinity: dict[str, Any] | None = None
    """Pod affinity rules, as in a Pod spec (nodeAffinity, podAffinity, podAntiAffinity)."""
    gpu_selector: GPUSelector | None = None
    """Require nodes by GPU product and memory (added to the node affinity)."""
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list, max_length=8)
    """Topology spread constraints, as in a Pod spec; the operator fills in labelSelector."""
    runtime_class_name: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """RuntimeClass of the serving pods (e.g. nvidia)."""
    priority_class_name: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """PriorityClass of the serving pods."""
    service_account_name: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """ServiceAccount of the serving pods (e.g. one bound to a cloud identity for s3:// artifacts)."""
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Serving image override; default is the operator's configured runtime image."""
    image_pull_policy: PullPolicy | None = None
    """Pull policy for the serving image; default is the operator's setting."""
    port: int = Field(default=8080, ge=1, le=65535)
    """Container and Service port of the REST (Open Inference Protocol V2) endpoint and /metrics."""
    grpc_port: int = Field(default=8081, ge=1, le=65535)
    """Container and Service port of the gRPC endpoint."""
    protocols: list[Protocol] = Field(
        default_factory=lambda: [Protocol.REST, Protocol.GRPC], min_length=1, max_length=2
    )
    """Protocols exposed on the Service: rest, grpc or both."""
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    """Who may call the model."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            *rules_of(RuntimeOptions),
            ("self.port != self.grpcPort", "port and grpcPort must differ", ".grpcPort"),
        )
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> Self:
        if self.port == self.grpc_port:
            raise ValueError("port and grpcPort must differ")
        return self

    def runtime_options(self) -> RuntimeOptions:
        """What `ptm serve` reads."""
        return narrow(self, RuntimeOptions)


# --- conversion ----------------------------------------------------------------------------------


class ConversionSpec(ConversionOptions):
    """How the checkpoint becomes ONNX (what `ptm convert` reads), plus the conversion Job's
    resources and limits."""

    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "1", "memory": "4Gi"}, limits={"memory": "8Gi"}
        )
    )
    """Resources of the conversion Job (export, optimization and validation run there; add
    nvidia.com/gpu to validate on a GPU or to build TensorRT engines)."""
    timeout: Duration = "30m"
    """Deadline of one conversion Job (activeDeadlineSeconds)."""
    backoff_limit: int = Field(default=2, ge=0, le=10)
    """Retries of a failed conversion Job before the revision is marked Failed."""

    def conversion_options(self) -> ConversionOptions:
        """What the converter reads."""
        return narrow(self, ConversionOptions)


# --- rollout -------------------------------------------------------------------------------------


class RolloutStrategy(StrEnum):
    CANARY = "Canary"
    RECREATE = "Recreate"


class PauseStep(Options):
    """Hold the current weight."""

    duration: Duration | None = None
    """How long to hold (e.g. 30s, 5m); absent holds until the user promotes (annotation
    ptm.dev/promote=true)."""


class AnalysisStep(Options):
    """Measure the canary against rollout.analysis for a while before going on."""

    duration: Duration = "1m"
    """How long to measure; the step passes when no measurement in it fails more than
    rollout.analysis.failureLimit times."""


class RolloutStep(Options):
    """One canary step: exactly one of setWeight, pause, analysis."""

    set_weight: int | None = Field(default=None, ge=1, le=100)
    """Share of traffic (percent) sent to the new revision from this step on."""
    pause: PauseStep | None = None
    """Hold for a duration, or until promoted when empty ({})."""
    analysis: AnalysisStep | None = None
    """Measure the canary before the next step."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "[has(self.setWeight), has(self.pause), has(self.analysis)].filter(x, x).size() == 1",
                "each rollout step sets exactly one of setWeight, pause, analysis",
            ),
        )
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if sum(x is not None for x in (self.set_weight, self.pause, self.analysis)) != 1:
            raise ValueError("each rollout step sets exactly one of setWeight, pause, analysis")
        return self


def _default_steps() -> list[RolloutStep]:
    return [
        RolloutStep(set_weight=10),
        RolloutStep(pause=PauseStep(duration="30s")),
        RolloutStep(analysis=AnalysisStep()),
        RolloutStep(set_weight=50),
        RolloutStep(pause=PauseStep(duration="30s")),
        RolloutStep(analysis=AnalysisStep()),
    ]


class TrafficRoutingType(StrEnum):
    REPLICA_RATIO = "replicaRatio"
    GATEWAY_API = "gatewayAPI"


class HTTPRouteRef(Options):
    """An HTTPRoute (Gateway API) whose backendRefs the operator weights."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Name of the HTTPRoute in the PretrainedModel's namespace."""


class TrafficRouting(Options):
    """How canary weights reach the traffic."""

    type: TrafficRoutingType = TrafficRoutingType.REPLICA_RATIO
    """replicaRatio: one Service over stable and canary pods, weights approximated by replica
    counts. gatewayAPI: weighted backendRefs in an HTTPRoute (exact weights)."""
    http_route: HTTPRouteRef | None = None
    """The HTTPRoute to manage; required for gatewayAPI."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.type != 'gatewayAPI' || has(self.httpRoute)",
                "httpRoute is required when type is gatewayAPI",
                ".httpRoute",
            ),
        )
    )

    @model_validator(mode="after")
    def _route_for_gateway(self) -> Self:
        if self.type is TrafficRoutingType.GATEWAY_API and self.http_route is None:
            raise ValueError("httpRoute is required when type is gatewayAPI")
        return self


class AnalysisSpec(Options):
    """What makes a canary healthy, measured every interval while it takes traffic."""

    interval: Duration = "30s"
    """Time between measurements."""
    failure_limit: int = Field(default=2, ge=0, le=100)
    """Failed measurements tolerated; one more rolls the canary back."""
    min_requests: int = Field(default=20, ge=0, le=1000000)
    """Requests a measurement needs to count (fewer: inconclusive, neither pass nor fail)."""
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    """Largest share of failed (5xx) canary requests."""
    max_p99_latency_ms: float | None = Field(default=None, gt=0)
    """Largest canary p99 latency in milliseconds (off when unset)."""
    max_p99_latency_ratio: float | None = Field(default=1.5, ge=1.0, le=100.0)
    """Largest canary p99 latency relative to the stable revision's (1.5: at most 50% slower)."""
    min_prediction_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    """Smallest share of goldenSet samples on which canary and stable predict the same
    (arg-max for classifiers, cosine similarity >= validation.minCosineSimilarity otherwise)."""
    golden_set: DataRef | None = None
    """Inputs sent to both revisions to compare predictions; needed by minPredictionAgreement."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.minPredictionAgreement) || has(self.goldenSet)",
                "minPredictionAgreement needs goldenSet",
                ".goldenSet",
            ),
        )
    )

    @model_validator(mode="after")
    def _agreement_needs_golden_set(self) -> Self:
        if self.min_prediction_agreement is not None and self.golden_set is None:
            raise ValueError("minPredictionAgreement needs goldenSet")
        return self


def _weights(steps: list[RolloutStep]) -> list[int]:
    return [s.set_weight for s in steps if s.set_weight is not None]


class RolloutSpec(Options):
    """How a new revision replaces the serving one."""

    strategy: RolloutStrategy = RolloutStrategy.CANARY
    """Canary: the new revision takes traffic step by step while analysis watches it, and is
    rolled back on failure. Recreate: the old revision is replaced at once (no extra GPUs)."""
    steps: list[RolloutStep] = Field(default_factory=_default_steps, max_length=32)
    """Canary steps, in order; setWeight values must increase. After the last step the new
    revision is promoted to stable (100%). Ignored by Recreate."""
    traffic_routing: TrafficRouting = Field(default_factory=TrafficRouting)
    """How weights are applied to traffic."""
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    """Health criteria checked while the canary takes traffic."""
    revision_history_limit: int = Field(default=5, ge=1, le=20)
    """Old revisions kept in status.revisions (and their artifacts) for rollback."""
    progress_deadline_seconds: int = Field(default=600, ge=30, le=86400)
    """A step that makes no progress for this long (pods not ready, no traffic) fails the
    rollout and rolls back."""
    paused: bool = False
    """Hold the rollout at its current step (analysis keeps running; nothing advances)."""
    scale_down_delay_seconds: int = Field(default=30, ge=0, le=86400)
    """After promotion, how long the previous revision keeps its pods (in-flight requests finish,
    a quick rollback is still instant) before its Deployment is removed."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.steps.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted() && "
                "self.steps.filter(s, has(s.setWeight)).all(s, "
                "self.steps.filter(t, has(t.setWeight) && t.setWeight == s.setWeight).size() == 1)",
                "setWeight must increase from step to step (e.g. 10, 50, 100)",
                ".steps",
            ),
        )
    )

    @model_validator(mode="after")
    def _weights_increase(self) -> Self:
        weights = _weights(self.steps)
        if any(b <= a for a, b in pairwise(weights)):
            raise ValueError("setWeight must increase from step to step (e.g. 10, 50, 100)")
        return self


# --- remediation ---------------------------------------------------------------------------------


class CrashLoopRollback(Options):
    """Roll back a revision whose pods crash-loop."""

    enabled: bool = True
    """Allow the action."""
    restart_threshold: int = Field(default=3, ge=1, le=100)
    """Container restarts (of one pod) that count as a crash loop."""


class MemoryBump(Options):
    """Raise the memory limit of pods that were OOMKilled."""

    enabled: bool = True
    """Allow the action."""
    factor: float = Field(default=1.5, gt=1.0, le=4.0)
    """Multiplier applied to the memory limit (and request) per bump."""
    ceiling: Quantity = "16Gi"
    """Never raise the memory limit above this."""


class StuckPodRestart(Options):
    """Delete serving pods that stay not-ready (they are recreated)."""

    enabled: bool = True
    """Allow the action."""
    not_ready_for: Duration = "10m"
    """How long a started pod may stay not-ready before it is restarted."""


class RemediationSpec(Options):
    """Automatic actions the operator may take when serving goes wrong; each taken action is
    recorded in status.remediations and as an Event."""

    rollback_on_crash_loop: CrashLoopRollback = Field(default_factory=CrashLoopRollback)
    """Roll back to the stable revision when a new one crash-loops."""
    memory_bump_on_oom: MemoryBump = Field(default_factory=MemoryBump, alias="memoryBumpOnOOM")
    """Raise the memory limit after OOMKilled, up to a ceiling."""
    restart_stuck_pods: StuckPodRestart = Field(default_factory=StuckPodRestart)
    """Restart pods stuck not-ready."""
    max_actions_per_hour: int = Field(default=6, ge=0, le=100)
    """Rate limit over all actions, so remediation cannot flap; 0 disables remediation."""
    history_limit: int = Field(default=20, ge=1, le=100)
    """Entries kept in status.remediations."""


# --- spec ----------------------------------------------------------------------------------------


class PretrainedModelSpec(Options):
    """Desired state of a served model: where the checkpoint is, how it becomes an optimized
    and validated ONNX artifact, how it is served and how updates roll out."""

    source: SourceSpec
    """The checkpoint (the only required section)."""
    conversion: ConversionSpec = Field(default_factory=ConversionSpec)
    """Export to ONNX."""
    optimization: OptimizationOptions = Field(default_factory=OptimizationOptions)
    """Optimized candidates (graph optimization, fp16, int8, pruning) built after export."""
    validation: ValidationOptions = Field(default_factory=ValidationOptions)
    """The gate every candidate must pass against the fp32 reference."""
    serving: ServingSpec = Field(default_factory=ServingSpec)
    """Serving pods, scaling, scheduling and exposure."""
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    """How a new revision replaces the serving one."""
    remediation: RemediationSpec = Field(default_factory=RemediationSpec)
    """Automatic repairs the operator may make."""
    revision: str | None = Field(default=None, max_length=63, pattern=REVISION_PATTERN)
    """Pin serving to this revision from status.revisions (roll back to it); unset serves the
    revision built from the current spec."""


# --- status --------------------------------------------------------------------------------------


class StatusModel(BaseModel):
    """Base for status parts: camelCase, unknown fields ignored (a newer operator may add some)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict as it appears in the object (None dropped)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ConditionType(StrEnum):
    READY = "Ready"
    CONVERTED = "Converted"
    VALIDATED = "Validated"
    AVAILABLE = "Available"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """One aspect of the state, Kubernetes API conventions (metav1.Condition)."""

    type: str = Field(
        min_length=1,
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    """Ready, Converted, Validated, Available, Progressing or Degraded."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """CamelCase reason for the last transition, for machines."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""
    last_transition_time: datetime
    """When status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """metadata.generation the condition was computed from."""


class RevisionState(StrEnum):
    PENDING = "Pending"
    CONVERTING = "Converting"
    VALIDATED = "Validated"
    FAILED = "Failed"
    CANARY = "Canary"
    STABLE = "Stable"
    SUPERSEDED = "Superseded"
    ROLLED_BACK = "RolledBack"


class ArtifactStatus(StatusModel):
    """A converted artifact (content-addressed; the server verifies sha256 before ready)."""

    uri: str
    """Where model.onnx is stored."""
    sha256: str
    """Hex digest of model.onnx."""
    size_bytes: int | None = None
    """Size of model.onnx."""


class RevisionStatus(StatusModel):
    """One revision: an artifact built from one version of the spec and source."""

    revision: str
    """Revision id (hash of everything that changes the artifact)."""
    state: RevisionState = RevisionState.PENDING
    """Where the revision is in its life."""
    source_digest: str | None = None
    """sha256 of the checkpoint it was converted from."""
    artifact: ArtifactStatus | None = None
    """The validated artifact."""
    precision: Precision | None = None
    """Precision that won validation and is served."""
    metrics: Metrics | None = None
    """Validation metrics of the served candidate against the fp32 reference."""
    created: datetime | None = None
    """When the revision was first seen."""
    state_since: datetime | None = None
    """When the revision entered its current state."""
    reason: str | None = Field(default=None, max_length=128)
    """CamelCase cause of a Failed or RolledBack state (ValidationFailed, InvalidSource, ...)."""
    message: str = ""
    """Why it is in its state (e.g. the validation failure)."""


class EndpointStatus(StatusModel):
    """Where to call the model from inside the cluster."""

    rest: str | None = None
    """Open Inference Protocol REST base URL (http://SERVICE.NAMESPACE.svc:PORT)."""
    grpc: str | None = None
    """gRPC target (SERVICE.NAMESPACE.svc:PORT)."""


class RemediationAction(StrEnum):
    ROLLBACK = "Rollback"
    MEMORY_BUMP = "MemoryBump"
    RESTART_POD = "RestartPod"


class RemediationRecord(StatusModel):
    """An automatic action the operator took."""

    time: datetime
    """When it was taken."""
    action: RemediationAction
    """What was done."""
    reason: str = Field(min_length=1, max_length=1024)
    """CamelCase cause (e.g. CrashLoopBackOff, OOMKilled, NotReady)."""
    revision: str | None = None
    """Revision acted on."""
    message: str = ""
    """Details (e.g. memory 2Gi -> 3Gi)."""


class PretrainedModelStatus(StatusModel):
    """Observed state, written by the operator only."""

    observed_generation: int | None = None
    """metadata.generation the status reflects."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready summarizes Converted, Validated, Available, Progressing and Degraded."""
    revisions: list[RevisionStatus] = Field(
        default_factory=list,
        max_length=100,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["revision"]},
    )
    """Revision history, newest last, bounded by rollout.revisionHistoryLimit."""
    stable_revision: str | None = None
    """Revision receiving the stable share of traffic."""
    canary_revision: str | None = None
    """Revision under canary rollout, if any."""
    current_step: int | None = Field(default=None, ge=0)
    """Index into rollout.steps of the canary's current step."""
    canary_weight: int | None = Field(default=None, ge=0, le=100)
    """Percent of traffic the canary receives."""
    step_started_at: datetime | None = None
    """When the canary entered its current step (pause durations, analysis windows and the
    progress deadline count from here)."""
    analysis_failures: int | None = Field(default=None, ge=0)
    """Failed analysis measurements of the current canary."""
    last_analysis_at: datetime | None = None
    """When the canary was last measured."""
    last_measurement: str | None = None
    """The last analysis measurement, in words."""
    endpoint: EndpointStatus | None = None
    """Where to call the model."""
    replicas: int | None = Field(default=None, ge=0)
    """Serving pods (all revisions)."""
    ready_replicas: int | None = Field(default=None, ge=0)
    """Ready serving pods (all revisions)."""
    source_digest: str | None = Field(default=None, max_length=64)
    """Digest of the checkpoint last seen by updatePolicy Poll (part of the revision id then)."""
    last_poll_at: datetime | None = None
    """When the source was last polled for a new digest."""
    memory_limit: str | None = Field(default=None, max_length=64)
    """Serving memory limit raised by OOMKilled remediation (used while larger than the spec's)."""
    remediations: list[RemediationRecord] = Field(default_factory=list, max_length=100)
    """Automatic actions taken, newest last, bounded by remediation.historyLimit."""

    def revision(self, revision_id: str) -> RevisionStatus | None:
        return next((r for r in self.revisions if r.revision == revision_id), None)


# --- the resource --------------------------------------------------------------------------------


class ObjectMeta(StatusModel):
    """The parts of metadata the operator reads."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None


class PretrainedModel(StatusModel):
    """A pretrained model served from a validated, optimized artifact."""

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: PretrainedModelSpec
    status: PretrainedModelStatus = Field(default_factory=PretrainedModelStatus)

    @model_validator(mode="after")
    def _is_ours(self) -> Self:
        if self.api_version != API_VERSION or self.kind != KIND:
            raise ValueError(f"expected {API_VERSION} {KIND}, got {self.api_version} {self.kind}")
        return self

    @classmethod
    def from_body(cls, body: Any) -> PretrainedModel:
        """Parse an object as the API server returns it (a kopf Body or a plain dict)."""
        return cls.model_validate(dict(body))

    @property
    def promote_requested(self) -> bool:
        return self.metadata.annotations.get(PROMOTE_ANNOTATION, "").lower() == "true"

    @property
    def abort_requested(self) -> bool:
        return self.metadata.annotations.get(ABORT_ANNOTATION, "").lower() == "true"
