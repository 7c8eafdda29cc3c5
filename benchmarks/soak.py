"""Soak of the serving path (issue 11): a long random loop over :class:`tileattn.cache.PagedKVCache`.

Each step: sequences arrive at random with random prompt lengths (``cache.append``), some finish, one may
append a chunk of several tokens (chunked prefill: ``Sq > 1``, causal), and every active sequence decodes one
token (``reserve``, ``attention_with_kvcache(q, **cache.kernel_args(seqs), k_new=, v_new=)``, ``advance``).
When pages run out, arrivals are refused and a sequence that cannot grow is finished (freed).

Beside the cache, a dense copy of every sequence's K/V tokens is kept on the CPU. Every ``check_every`` steps
(and at the last step), the step's attention outputs are checked against the float64 oracle
(``tileattn.reference.naive_attention`` on the dense copy, the tolerance of ``tileattn.testing``), every active
sequence's pages against its dense copy (bit for bit), and the page accounting (pages in use plus free pages
is the pool; no page held twice). Pools start filled with NaN and freed pages are refilled with NaN, so a read
of a slot that no sequence wrote shows up as NaN in an output. At the end every sequence is freed and all
pages must be free; on CUDA, ``torch.cuda.memory_allocated()`` less the split-decode workspace (a buffer reused by
every call, grown to the largest batch seen, reported apart) must not grow over the second half of the run: a
leak grows with the steps, while a library's one-time lazy allocation (cuBLAS's 32 MiB workspace the first time
a product runs on a new stream) comes once, early. Every rise between checks is listed in the report.

GPU run::

    python benchmarks/soak.py --device cuda --steps 10000 --out benchmarks/results/soak-<gpu>-<date>.json

``tests/test_soak.py`` runs a short configuration of :func:`run_soak` in CI (on CPU: Triton's interpreter on some
steps and every other check, the tiled PyTorch path on the others).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import sys
import time

import torch

import tileattn
from tileattn.cache import PagedKVCache
from tileattn.reference import gather_cache
from tileattn.testing import assert_matches_oracle

# Live tensors at a check are the cache's and nothing else; leaking one 512-byte allocator block per step would pass
# this within 2048 steps.
MEMORY_SLACK_BYTES = 1 << 20


@dataclasses.dataclass
class SoakConfig:
    """The serving loop's shape and traffic. Defaults: the GPU run (LLaMA-like heads, 2048-page pool)."""

    steps: int = 10_000
    device: str = "cuda"
    dtype: torch.dtype = torch.float16
    seed: int = 0
    check_every: int = 200
    num_pages: int = 2048
    page_size: int = 16
    kv_heads: int = 8
    q_heads_per_kv_head: int = 4
    head_dim: int = 128
    max_seqs: int = 64
    max_pages_per_seq: int = 128
    max_prompt: int = 1024
    max_chunk: int = 16
    arrival_probability: float = 0.25
    finish_probability: float = 0.01
    chunk_probability: float = 0.1
    step_backends: tuple[str, ...] = ("auto",)  # cycled over the steps
    check_backends: tuple[str, ...] = ("auto",)  # cycled over the check steps


@dataclasses.dataclass
class SoakReport:
    """What the loop did, and ``torch.cuda.memory_allocated()`` between steps at the first and the last check."""

    steps: int = 0
    sequences_served: int = 0
    max_concurrent: int = 0
    pages: int = 0
    tokens_decoded: int = 0
    chunks_appended: int = 0
    arrivals_refused: int = 0
    finished_out_of_pages: int = 0
    finished_at_max_length: int = 0
    checks_passed: int = 0
    memory_first_check: int | None = None  # torch.cuda.memory_allocated() less the workspace, bytes; None on CPU
    memory_last_check: int | None = None
    workspace_first_check: int | None = None  # the split-decode workspace, bytes
    workspace_last_check: int | None = None
    memory_at_half: int | None = None  # at the first check of the second half of the run
    memory_rises: list = dataclasses.field(default_factory=list)  # (step, bytes before, bytes after)
    elapsed_s: float = 0.0


class _Loop:
    """The cache, the dense CPU copy of every active sequence's tokens, and the random traffic."""

    def __init__(self, config: SoakConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.decisions = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.cache = PagedKVCache(config.num_pages, config.page_size, config.kv_heads, config.head_dim,
                                  max_seqs=config.max_seqs, max_pages_per_seq=config.max_pages_per_seq,
                                  dtype=config.dtype, device=self.device)
        self.cache.k_pool.fill_(float("nan"))  # an unwritten slot read by a kernel poisons its output
        self.cache.v_pool.fill_(float("nan"))
        # seq -> (k chunks, v chunks) [Hkv, n, D] on the CPU, in order: appending costs O(new tokens) per step.
        self.dense: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.report = SoakReport(pages=config.num_pages)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator).to(self.config.dtype)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.config.page_size)

    def tokens(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything sent for ``seq``: ``k``, ``v`` ``[Hkv, length, D]`` on the CPU."""
        k_chunks, v_chunks = self.dense[seq]
        return torch.cat(k_chunks, 1), torch.cat(v_chunks, 1)

    def arrive(self) -> None:
        """A new sequence with a random prompt, unless no slot or not enough free pages are left."""
        length = self.decisions.randint(1, min(self.config.max_prompt,
                                               self.config.max_pages_per_seq * self.config.page_size))
        if len(self.dense) == self.config.max_seqs or self.pages_for(length) > self.cache.num_free_pages:
            self.report.arrivals_refused += 1
            return
        k, v = (self.randn(self.config.kv_heads, length, self.config.head_dim) for _ in range(2))
        seq = self.cache.add_sequence()
        self.cache.append(seq, k.to(self.device), v.to(self.device))
        self.dense[seq] = ([k], [v])
        self.report.sequences_served += 1
        self.report.max_concurrent = max(self.report.max_concurrent, len(self.dense))

    def finish(self, seq: int) -> None:
        """Free ``seq`` and refill the pages it held with NaN, so that a later stale read shows."""
        pages = self.cache.block_table[seq, : self.pages_for(self.cache.length(seq))].long()
        self.cache.free_sequence(seq)
        self.cache.k_pool[pages] = float("nan")
        self.cache.v_pool[pages] = float("nan")
        del self.dense[seq]

    def reserve_or_finish(self, seqs: list[int], tokens: int) -> list[int]:
        """The sequences of ``seqs`` that got room for ``tokens`` more; the others are finished (the pool or
        their page list is full: ``reserve`` raises and changes nothing)."""
        kept = []
        for seq in seqs:
            try:
                self.cache.reserve(seq, tokens)
            except RuntimeError:  # out of pages
                self.report.finished_out_of_pages += 1
                self.finish(seq)
            except ValueError:  # max_pages_per_seq reached
                self.report.finished_at_max_length += 1
                self.finish(seq)
            else:
                kept.append(seq)
        return kept

    def attend(self, seqs: list[int], tokens: int, backend: str, check: bool, step: int) -> None:
        """``tokens`` new tokens for each of ``seqs`` (room reserved): write them and attend, causal."""
        c = self.config
        hq = c.kv_heads * c.q_heads_per_kv_head
        q = self.randn(len(seqs), hq, tokens, c.head_dim).to(self.device)
        k_new, v_new = (self.randn(len(seqs), c.kv_heads, tokens, c.head_dim) for _ in range(2))
        out = tileattn.attention_with_kvcache(q, **self.cache.kernel_args(seqs), k_new=k_new.to(self.device),
                                              v_new=v_new.to(self.device), backend=backend)
        for i, seq in enumerate(seqs):
            self.cache.advance(seq, tokens)
            self.dense[seq][0].append(k_new[i])
            self.dense[seq][1].append(v_new[i])
        if check:
            for i, seq in enumerate(seqs):
                k, v = (t[None].to(self.device) for t in self.tokens(seq))
                try:
                    assert_matches_oracle(out[i:i + 1], q[i:i + 1], k, v, causal=True)
                except AssertionError as exc:
                    raise AssertionError(f"step {step}, sequence {seq} ({k.shape[2]} tokens, {tokens} new, backend "
                                         f"{backend!r}): {exc}") from None

    def check_pages(self, step: int) -> None:
        """Every active sequence's pages hold exactly its tokens; pages in use and free ones make the pool."""
        in_use = []
        for seq in self.dense:
            k, v = self.tokens(seq)
            length = self.cache.length(seq)
            if length != k.shape[1]:
                raise AssertionError(f"step {step}: sequence {seq} has {length} tokens in the cache, {k.shape[1]} sent")
            in_use += self.cache.block_table[seq, : self.pages_for(length)].tolist()
            for name, pool, dense in (("k", self.cache.k_pool, k), ("v", self.cache.v_pool, v)):
                stored = gather_cache(pool.transpose(1, 2), seq, length, self.cache.block_table).cpu()
                if not torch.equal(stored, dense):
                    bad = (stored != dense).any(0).any(-1).nonzero().flatten()
                    raise AssertionError(f"step {step}: sequence {seq}'s {name} differs from what was written at "
                                         f"tokens {bad[:8].tolist()} (of {length})")
        if len(set(in_use)) != len(in_use):
            raise AssertionError(f"step {step}: a page is held by two sequences")
        if len(in_use) + self.cache.num_free_pages != self.config.num_pages:
            raise AssertionError(f"step {step}: {len(in_use)} pages in use + {self.cache.num_free_pages} free != "
                                 f"{self.config.num_pages}: pages leaked")

    def memory(self) -> tuple[int | None, int | None]:
        """``(memory_allocated() less the workspace, workspace)`` in bytes, or ``(None, None)`` on CPU."""
        if self.device.type != "cuda":
            return None, None
        from tileattn.kernels.decode import workspace_bytes  # here: Triton is only needed on CUDA

        workspace = workspace_bytes()
        return torch.cuda.memory_allocated(self.device) - workspace, workspace

    def step(self, step: int, check: bool) -> None:
        c, report = self.config, self.report
        backend = (c.check_backends[report.checks_passed % len(c.check_backends)] if check
                   else c.step_backends[step % len(c.step_backends)])
        if self.decisions.random() < c.arrival_probability:
            self.arrive()
        for seq in list(self.dense):
            if self.decisions.random() < c.finish_probability:
                self.finish(seq)
        if self.dense and (check or self.decisions.random() < c.chunk_probability):  # every check sees a chunk
            seq = self.decisions.choice(list(self.dense))
            chunk = self.decisions.randint(2, c.max_chunk)
            if self.reserve_or_finish([seq], chunk):
                self.attend([seq], chunk, backend, check, step)
                report.chunks_appended += 1
        seqs = self.reserve_or_finish(list(self.dense), 1)
        if seqs:
            self.attend(seqs, 1, backend, check, step)
            report.tokens_decoded += len(seqs)
        if check:
            self.check_pages(step)


def run_soak(config: SoakConfig, log=None) -> SoakReport:
    """Run the soak; raises AssertionError (step, sequence, what differs) at the first failed check.
    ``log(line)``, if given, gets one progress line per check."""
    start = time.perf_counter()
    loop = _Loop(config)
    report = loop.report
    for step in range(config.steps):
        check = (step + 1) % config.check_every == 0 or step == config.steps - 1
        memory, workspace = loop.memory() if check else (None, None)  # between steps: the cache and the loop's state
        loop.step(step, check)
        report.steps = step + 1
        if check:
            report.checks_passed += 1
            if memory is not None:
                if report.memory_first_check is None:
                    report.memory_first_check, report.workspace_first_check = memory, workspace
                elif memory - report.memory_last_check > MEMORY_SLACK_BYTES:
                    report.memory_rises.append((step + 1, report.memory_last_check, memory))
                if report.memory_at_half is None and step >= config.steps // 2:
                    report.memory_at_half = memory
                report.memory_last_check, report.workspace_last_check = memory, workspace
            if log:
                log(f"step {step + 1}: {len(loop.dense)} active, {loop.cache.num_free_pages} free pages, "
                    f"{report.checks_passed} checks passed")
    for seq in list(loop.dense):
        loop.finish(seq)
    if loop.cache.num_free_pages != config.num_pages:
        raise AssertionError(f"{config.num_pages - loop.cache.num_free_pages} pages still held after freeing every "
                             "sequence")
    if report.memory_at_half is not None and report.checks_passed < 4:  # too few checks for halves: all must be flat
        report.memory_at_half = report.memory_first_check
    if report.memory_at_half is not None and report.memory_last_check - report.memory_at_half > MEMORY_SLACK_BYTES:
        raise AssertionError(f"device memory grew from {report.memory_at_half} to {report.memory_last_check} bytes over "
                             f"the second half of the run (rises at (step, before, after): {report.memory_rises})")
    report.elapsed_s = time.perf_counter() - start
    return report


def summary_table(report: SoakReport) -> str:
    def mib(n):
        return "n/a" if n is None else f"{n / 2**20:.1f} MiB"

    rows = [("steps", report.steps), ("sequences served", report.sequences_served),
            ("max concurrent", report.max_concurrent), ("pages", report.pages),
            ("tokens decoded", report.tokens_decoded), ("chunks appended", report.chunks_appended),
            ("arrivals refused / finished out of pages / at max length",
             f"{report.arrivals_refused} / {report.finished_out_of_pages} / {report.finished_at_max_length}"),
            ("checks passed", report.checks_passed),
            ("memory at first / last check (less the workspace)",
             f"{mib(report.memory_first_check)} / {mib(report.memory_last_check)}"),
            ("rises between checks (step: MiB before -> after)",
             ", ".join(f"{step}: {mib(a)} -> {mib(b)}" for step, a, b in report.memory_rises) or "none"),
            ("split-decode workspace at first / last check",
             f"{mib(report.workspace_first_check)} / {mib(report.workspace_last_check)}"),
            ("elapsed", f"{report.elapsed_s:.1f} s")]
    return "\n".join(["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


def main(argv=None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--check-every", type=int, default=defaults.check_every)
    parser.add_argument("--out", help="write the configuration and the report as JSON here")
    args = parser.parse_args(argv)
    config = dataclasses.replace(defaults, steps=args.steps, device=args.device, seed=args.seed,
                                 check_every=args.check_every)
    settings = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in dataclasses.asdict(config).items()}
    record = dict(config=settings,
                  device=torch.cuda.get_device_name(config.device) if config.device.startswith("cuda") else "cpu",
                  torch=torch.__version__, triton=_triton_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        report = run_soak(config, log=lambda line: print(line, flush=True))
    except AssertionError as exc:
        record.update(passed=False, failure=str(exc))
        print(f"FAILED: {exc}", file=sys.stderr)
        status = 1
    else:
        record.update(passed=True, report=dataclasses.asdict(report))
        print(summary_table(report))
        status = 0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return status


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
