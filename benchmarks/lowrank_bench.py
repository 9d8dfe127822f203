"""Children without materialisation on CPU: materialise + load + forward vs factored forward.

Not a test: it prints figures measured side by side in one run.

Setup: a base (a tiny random Llama, and SmolLM2-135M-Instruct fp32 from
:func:`cycleqd.models.smollm2.ensure_smollm2` unless ``--tiny-only``) and K = 2 synthetic
LoRA-like experts: a random rank-``--expert-rank`` delta ``B @ A`` on every attention and
MLP projection (the usual LoRA target modules; embeddings, norms untouched). The compact
SVD-genome space uses the official SVD mutation at full rank; the experts' SVD bases are
computed exactly from the factors (QR of ``B`` and ``A^T`` + an r x r SVD), which is what
the ``svd_tol`` truncation of a full SVD would keep.

Timed (medians over ``--reps``; wall and this process's CPU time):

* ``materialise``: ``space.materialize(child)`` + ``model.load_state_dict`` (the
  weight-copy path the evaluator uses today) + one forward of ``B`` prompts.
* ``factored``: ``LowRankChildren.set_children([child])`` + the same forward.
* per forward only: the materialised model vs the factored path (what each extra forward
  pass costs: the factored path pays ``R (m + n)`` per Linear and token, R = sum of ranks).
* mixed batch of ``B`` children, one prompt each: ``B`` x (materialise + load + 1-row
  forward) vs one factored forward of the ``B`` rows.
* greedy decoding of ``--new-tokens`` tokens for one child (prefill + decode steps).

The two sides of each row are called alternately. Timing only: in the interleaved rows the
factored side runs over whatever child the other side last loaded (same cost as over
theta_base); the exactness figure printed compares against a separate materialised model.

Run:  nice python benchmarks/lowrank_bench.py   (~2-4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cycleqd.inference.lowrank import LowRankChildren
from cycleqd.ops import SVDGenomeWeightSpace, make_crossover
from cycleqd.ops.mutation import SVDExpertMutation
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe, load  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(fa, fb, reps: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall s, process CPU s) of ``fa`` and of ``fb`` over ``reps`` calls each, after
    one warm-up each, the calls interleaved (a, b, a, b, ...) so that load from other
    processes on a shared machine hits both sides alike."""
    fa(), fb()
    res = {0: ([], []), 1: ([], [])}
    for _ in range(reps):
        for i, fn in enumerate((fa, fb)):
            c, t = time.process_time(), time.perf_counter()
            fn()
            res[i][0].append(time.perf_counter() - t)
            res[i][1].append(time.process_time() - c)
    return tuple((statistics.median(w), statistics.median(c)) for w, c in (res[0], res[1]))


def show(la: str, lb: str, ab) -> None:
    (aw, ac), (bw, bc) = ab
    print(f"  {la:<48} {aw * 1e3:9.1f} ms wall {ac * 1e3:9.1f} ms cpu | {lb:<26} "
          f"{bw * 1e3:9.1f} ms wall {bc * 1e3:9.1f} ms cpu | ratio a/b wall {aw / bw:5.2f} cpu {ac / bc:5.2f}",
          flush=True)


def lora_experts(base: dict, K: int, rank: int, scale: float):
    """K task vectors with a rank-``rank`` delta on every LoRA target, and their exact SVDs."""
    taus, bases = [], []
    for k in range(K):
        g = torch.Generator().manual_seed(100 + k)
        tau, basis = {}, {}
        for n, v in base.items():
            if v.ndim == 2 and any(t in n for t in TARGETS):
                B = torch.randn(v.shape[0], rank, generator=g) * (scale / rank ** 0.5)
                A = torch.randn(rank, v.shape[1], generator=g)
                tau[n] = B @ A
                qb, rb = torch.linalg.qr(B)
                qa, ra = torch.linalg.qr(A.T)
                u, s, vh = torch.linalg.svd(rb @ ra.T)
                basis[n] = ((qb @ u).contiguous(), s, (vh @ qa.T).contiguous())
            else:
                tau[n] = torch.zeros(v.shape, dtype=torch.float32)
        taus.append(tau), bases.append(basis)
    return taus, bases


def bench(label: str, model_dir: Path, args) -> None:
    base = load_file(str(model_dir / "model.safetensors"))
    taus, bases = lora_experts(base, 2, args.expert_rank, args.scale)
    mu = SVDExpertMutation(taus, rate=0.1, bases=bases)
    space = SVDGenomeWeightSpace(base, taus, make_crossover({"name": "linear", "sigma": 0.05}), mu)
    g = torch.Generator().manual_seed(0)
    e = space.expert_genomes()
    kids = [space.mutate(space.crossover([e[0], e[1]], g), i % 2, g) for i in range(args.batch)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {label}: {n_params / 1e6:.1f} M params, K=2 experts of rank {args.expert_rank}, "
          f"batch {args.batch} x {args.seq} tokens ==")

    lr = LowRankChildren(model, space)

    def materialise(kid=kids[0], x=ids):
        lr.remove()   # interleaved with the factored path: plain forward here
        model.load_state_dict(space.materialize(kid), strict=False)
        with torch.no_grad():
            return model(x).logits

    def factored(kid=kids[0], x=ids):
        lr.set_children([kid], rows=[0] * x.shape[0])
        with torch.no_grad():
            return model(x).logits

    t0 = time.perf_counter()
    lr2 = LowRankChildren(model, space)
    print(f"  LowRankChildren setup (once per run: gather factors, residual checks): "
          f"{time.perf_counter() - t0:.2f} s")
    t0 = time.process_time()
    lr2.set_children(kids)
    print(f"  set_children({len(kids)} children): {(time.process_time() - t0) * 1e3:.1f} ms cpu")
    lr2.remove()
    del lr2
    show("child: materialise+load+forward", "factored set+forward", timed(materialise, factored, args.reps))
    lr.remove()
    dense_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dense_model.load_state_dict(space.materialize(kids[0]), strict=False)
    model.load_state_dict(base, strict=False)   # the factored path runs on theta_base
    lr.set_children([kids[0]], rows=[0] * args.batch)
    with torch.no_grad():
        ref, got = dense_model(ids).logits, model(ids).logits
        show("forward only: materialised model", "factored forward",
             timed(lambda: dense_model(ids), lambda: model(ids), args.reps))
    del dense_model
    lr.remove()
    err = float((got - ref).abs().max() / ref.abs().max())
    model.load_state_dict(base, strict=False)

    def mixed_dense():
        for i, kid in enumerate(kids):
            materialise(kid, ids[i:i + 1])

    def mixed_fact():
        lr.set_children(kids)
        with torch.no_grad():
            return model(ids).logits

    show(f"{args.batch} children: {args.batch}x(materialise+load+1-row fwd)", "one factored mixed forward",
         timed(mixed_dense, mixed_fact, args.reps))
    lr.remove()
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    one = ids[:1]

    def gen_dense():
        lr.remove()
        model.load_state_dict(space.materialize(kids[0]), strict=False)
        with torch.no_grad():
            return model.generate(one, attention_mask=torch.ones_like(one), **kw)

    def gen_fact():
        lr.set_children([kids[0]])
        with torch.no_grad():
            return model.generate(one, attention_mask=torch.ones_like(one), **kw)

    show(f"greedy {args.new_tokens} tokens: materialise+generate", "factored generate",
         timed(gen_dense, gen_fact, max(1, args.reps // 2)))
    lr.remove()
    print(f"  max |logits diff| / max |logits| (factored vs materialised): {err:.1e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--expert-rank", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.002)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tiny-only", action="store_true")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = describe()
    print(f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{load()}")
    from cycleqd.models.tiny import make_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_llama(Path(tmp) / "tiny", seed=0, hidden_size=256, num_layers=4, vocab_size=2048)
        bench("tiny Llama (d=256, 4 layers)", tiny, args)
    if not args.tiny_only:
        from cycleqd.models.smollm2 import ensure_smollm2

        bench("SmolLM2-135M-Instruct fp32", ensure_smollm2(), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
