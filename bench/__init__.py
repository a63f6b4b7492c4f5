"""clipmesh's benchmarks, run as modules from the repository root (`python -m bench.<script>`):

    bench.bench_strategies      strategies vs diffusers (vanilla, Ulysses) -> docs/bench-strategies.md
    bench.bench_ulysses         ulysses vs exact vs diffusers' Ulysses     -> its section of that file
    bench.bench_block_pipeline  block_pipeline (DualParal)                 -> docs/bench-block-pipeline.md
    bench.bench_exact           exact at 1..N workers                      -> docs/bench-exact.md
    bench.clip_parallel_rope    clip_parallel's global-frame RoPE policies (table on stdout)

The pieces they share:

    bench.common   constants every script uses (prompt, guidance, seed, threads, timeouts, paths)
    bench.procs    rank processes: spawn one per rank, collect results, stop them all on any exit, RSS
    bench.runners  what a rank runs: rendezvous, plans from the planner, the clipmesh runner,
                   diffusers' WanPipeline (vanilla, or its Ulysses context parallelism)
    bench.rows     a table row, its numbers from the ranks' results, time estimates for a budget
    bench.checks   the strategies benchmark's targets
    bench.report   tables, footnotes, the machine line, writing markdown (and sections of it)
"""
