"""`ptm plan -f model.yaml`: what the operator would create, change or delete, without acting.

Offline (default) it plans against an empty cluster: the revision, the conversion Job and what
serving would look like once that revision validates. With `--live` it reads the resource's
current status and children from the cluster (KUBECONFIG) and plans from there, so it shows
exactly the next step the running operator would take.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from ptm_operator.api import ArtifactStatus, PretrainedModel, RevisionState, RevisionStatus
from ptm_operator.builders.store import store_from_settings
from ptm_operator.observed import Observed
from ptm_operator.planning import Plan, plan
from ptm_operator.revision import revision_of
from ptm_operator.settings import Settings


def _load(path: str, namespace: str) -> PretrainedModel:
    with open(path) if path != "-" else sys.stdin as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    if len(docs) != 1:
        raise SystemExit(f"ptm plan: expected one PretrainedModel in {path}, found {len(docs)} documents")
    body: dict[str, Any] = docs[0]
    meta = body.setdefault("metadata", {})
    meta.setdefault("namespace", namespace)
    meta.setdefault("generation", 1)
    meta.setdefault("uid", "00000000-0000-0000-0000-000000000000")
    return PretrainedModel.from_body(body)


def _summary(result: Plan) -> list[str]:
    lines = [f"  apply   {m['kind']}/{m['metadata']['name']}" for m in result.apply]
    lines += [f"  delete  {d.kind}/{d.name}" for d in result.delete]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ptm plan", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("-f", "--filename", required=True, help="PretrainedModel manifest ('-' for stdin)")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--live", action="store_true", help="plan from the cluster's current state")
    parser.add_argument("-o", "--output", choices=["summary", "yaml"], default="summary")
    args = parser.parse_args(argv)
    try:
        model = _load(args.filename, args.namespace)
    except ValidationError as exc:
        print(f"ptm plan: invalid PretrainedModel:\n{exc}", file=sys.stderr)
        return 2
    settings = Settings()
    store = store_from_settings(settings)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    observed = Observed()
    if args.live:
        from ptm_operator.handlers import kube

        k = kube()
        live = k.get_model(model.metadata.namespace or "default", model.metadata.name)
        if live is not None:
            model.status = live.status
            model.metadata.uid = live.metadata.uid
            model.metadata.generation = (live.metadata.generation or 0) + (live.spec != model.spec)
        observed = k.observe(model)
    revision = revision_of(model.spec)
    print(f"revision: {model.spec.revision or revision}{' (pinned)' if model.spec.revision else ''}")
    result = plan(model, observed, now, settings, store)
    print("now:")
    print("\n".join(_summary(result)) or "  nothing to change")
    if not args.live and not model.spec.revision:
        # What follows once the conversion succeeds: pretend a validated artifact exists.
        after = model.model_copy(deep=True)
        after.status = result.status
        rec = after.status.revision(revision) or RevisionStatus(revision=revision)
        rec.state = RevisionState.VALIDATED
        rec.artifact = ArtifactStatus(
            uri=store.artifact_dir(args.namespace, model.metadata.name, revision), sha256="0" * 64
        )
        after.status.revisions = [r for r in after.status.revisions if r.revision != revision] + [rec]
        result = plan(after, Observed(), now, settings, store)
        print("after the conversion validates:")
        print("\n".join(_summary(result)))
    if args.output == "yaml":
        print("---")
        print(yaml.safe_dump_all(result.apply, sort_keys=False), end="")
    for line in result.status.conditions:
        print(f"condition {line.type}={line.status.value} {line.reason}: {line.message}")
    return 0
