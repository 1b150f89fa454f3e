"""How far path A's own float32 scores move when only the GEMM library changes (MKL sgemm vs oneDNN).

    python benchmarks/gemm_floor.py                      # the tiny test checkpoint, as the parity tests use it
    python benchmarks/gemm_floor.py --preset 0.8b

Runs the model card's path A (generate, one token; score from the softmax over yes/no) on the same prompts
three ways: torch's `F.linear` on 2 threads, the same on 1 thread, and `F.linear` swapped for oneDNN's
operator (`benchmarks/onednn_gemm.py`). Prints the per-document score differences. This
is why the parity tests compare the engines with path A on the same GEMM (see tests/conftest.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from onednn_gemm import f_linear_on_onednn  # noqa: E402

from prism_ray.checkpoints import preset_checkpoint  # noqa: E402
from prism_ray.engine import load_model  # noqa: E402

QUERY = "boiling point"


def documents() -> list[str]:
    """The documents of tests/test_score_engine.py::test_truncated_documents_equal_path_a_on_the_cut_prompt
    (English prose of 10-450 words, a short one, a long Chinese one), cut to fit 320 prompt tokens as there."""
    from conftest import english_texts

    return [" ".join(english_texts(3, 150, 150)), "short one", "两百字" * 200] + english_texts(10, 10, 150)


@torch.inference_mode()
def path_a_scores(model, prompts, docs) -> list[float]:
    out = []
    for doc in docs:
        ids = torch.tensor([prompts.encode(QUERY, doc).ids])
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        two = torch.softmax(logits[[prompts.yes_id, prompts.no_id]], dim=-1)
        out.append(two[0].item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    ckpt = preset_checkpoint(args.preset)
    loaded = load_model(ckpt, dtype="float32", max_length=320)
    docs = documents()
    threads = torch.get_num_threads()
    mkl = path_a_scores(loaded.model, loaded.prompts, docs)
    with f_linear_on_onednn():
        dnn = path_a_scores(loaded.model, loaded.prompts, docs)
    torch.set_num_threads(1)
    one = path_a_scores(loaded.model, loaded.prompts, docs)
    torch.set_num_threads(threads)
    print(f"checkpoint: {ckpt} ({loaded.model.config.num_hidden_layers} layers), float32, {len(docs)} documents")
    for name, other in (("MKL vs oneDNN", dnn), (f"MKL {threads} threads vs 1 thread", one)):
        diffs = [abs(a - b) for a, b in zip(mkl, other)]
        print(f"  path A {name:<28} max |score diff| {max(diffs):.1e}   per document: "
              + " ".join(f"{d:.1e}" for d in diffs))


if __name__ == "__main__":
    main()
