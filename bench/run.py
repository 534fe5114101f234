#!/usr/bin/env python
"""Benchmark runner (KERNEL_GUIDE.md §9): every provider of a case side by side, in one process.

    python bench/run.py --quick --device cpu
    python bench/run.py --device cuda --filter '^rows/.*/65536x1000/' --modes full
    python bench/run.py --list --quick

Providers
    ``oodkernels``          the public criterion ``oodkernels.loss.X`` / score ``oodkernels.scores.x``; the
                            ``backend`` column records what oodkernels.backend_info() says runs it.
    ``reference``           ``oodkernels.reference.X``, eager plain PyTorch.
    ``reference-compiled``  the same under ``torch.compile(dynamic=False)``, compiled once per case (Dynamo is
                            reset per case) during the warm-up, outside the timing.
    ``pytorch-ood``         pytorch-ood 0.4.0 (through tests/_pytorch_ood.py's torchvision stand-in) when
                            importable; skipped for criteria it lacks or inputs it rejects (e.g. some bf16).

``oodkernels.config.data_checks`` is off for the whole run, so oodkernels and the reference never synchronise.

Modes: ``fwd`` (forward with grad enabled), ``bwd`` (``loss.backward(retain_graph=True)`` on one fixed
forward), ``full`` (forward + backward), ``no-grad`` (forward under ``torch.no_grad()``). Scores run ``fwd`` and
``no-grad`` only (their input does not require grad).

Timing: CUDA ``triton.testing.do_bench`` (quantiles 0.5/0.2/0.8, ``grad_to_none``), CPU
``torch.utils.benchmark.Timer.blocked_autorange`` with a fixed thread count (median, p20, p80 of the per-run
times). The Triton interpreter is never benchmarked.

Results are appended to ``<out>/<device-slug>_<YYYY-MM-DD>.csv`` (``--overwrite`` replaces the file); see
bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLUMNS = [
    "case",
    "provider",
    "backend",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "p50",
    "p20",
    "p80",
    "config_json",
    "device",
    "torch",
    "triton",
    "cuda",
    "git_commit",
    "timestamp",
    "max_abs_err",
    "speedup_vs_reference",
    "speedup_vs_reference_compiled",
    "speedup_vs_pytorch_ood",
]

#: ``oodkernels`` runs the auto backend; ``oodkernels-cpp`` forces the C++ CPU backend (CPU only)
PROVIDERS = ("oodkernels", "oodkernels-cpp", "reference", "reference-compiled", "pytorch-ood")
MODES = ("fwd", "bwd", "full", "no-grad")
SCORE_MODES = ("fwd", "no-grad")
SPEEDUP_COLUMNS = {
    "reference": "speedup_vs_reference",
    "reference-compiled": "speedup_vs_reference_compiled",
    "pytorch-ood": "speedup_vs_pytorch_ood",
}
PYTORCH_OOD_SCORES = {
    "energy": "EnergyBased",
    "max_softmax": "MaxSoftmax",
    "max_logit": "MaxLogit",
    "entropy": "Entropy",
}

INTERPRETER_MESSAGE = (
    "bench/run.py: TRITON_INTERPRET=1 is set. The Triton interpreter is a correctness tool and is never "
    "benchmarked (KERNEL_GUIDE §9). Unset it (e.g. `env -u TRITON_INTERPRET python bench/run.py ...`)."
)


class Unavailable(Exception):
    """A provider that does not apply to a case (reported as skipped, never as an error of the run)."""


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device) -> str:
    name = device_name(device)
    return slug(name if device.type == "cuda" else f"cpu-{name}")


def triton_version() -> str:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:
        return ""


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")
    except Exception:
        return "unknown"


def load_pytorch_ood():
    """pytorch-ood 0.4.0 via the test suite's torchvision stand-in, or None (with the reason)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        from _pytorch_ood import load

        module = load()
    except Exception as exc:  # a broken install must not stop the benchmark
        return None, f"pytorch-ood import failed: {type(exc).__name__}: {exc}"
    if module is None:
        return None, "pytorch-ood 0.4.0 is not installed"
    return module, ""


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[name]


def make_inputs(case, device, seed: int = 0):
    """Logits ``randn * 2`` in the case's dtype and memory format, and targets with the case's label pattern.

    ``mixed``: a ``ood_fraction`` share of the entries (at random positions) is OOD (-1), the rest uniform ID
    labels in ``[0, C)`` (``[0, C - 1)`` for BackgroundClassLoss, whose last column is the background class).
    """
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    logits = torch.randn(case.shape, device=device, generator=gen, dtype=torch.float32).mul_(2.0)
    logits = logits.to(torch_dtype(case.dtype))
    if case.memory_format == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    if case.family == "scores":
        return logits, None
    target_shape = (case.shape[0],) + tuple(case.shape[2:])
    n_id = case.classes - 1 if case.criterion == "BackgroundClassLoss" else case.classes
    if case.family == "centers":
        n_id = int(case.hparams.get("n_classes", 1))
    targets = torch.randint(0, n_id, target_shape, device=device, generator=gen, dtype=torch.int64)
    if case.labels == "mixed":
        ood = torch.rand(target_shape, device=device, generator=gen) < case.ood_fraction
        targets = torch.where(ood, torch.full_like(targets, -1), targets)
    elif case.labels == "all-ood":
        targets = torch.full_like(targets, -1)
    elif case.labels != "all-id":
        raise ValueError(f"labels: unknown pattern {case.labels!r}")
    return logits, targets


# ----------------------------------------------------------------------------------------------
# providers: each returns fn(logits, targets) -> loss (rows) or fn(logits) -> scores
# ----------------------------------------------------------------------------------------------


def criterion_kwargs(case) -> dict:
    kwargs = dict(case.hparams)
    if case.reduction is not None:
        kwargs["reduction"] = case.reduction
    return kwargs


def center_criterion(namespace, case):
    """``fn(features, targets)`` of a center criterion: ``crit(crit.distance(z), y)`` for CAC / Center / MCHAD,
    ``crit(z, y)`` for II and DeepSVDD. Constructed from seed 0, so every provider has the same centers (the
    construction draws are pytorch-ood's, LOSS_CONTRACT §6); moved to the features' device on first use."""
    import torch

    torch.manual_seed(0)
    module = getattr(namespace, case.criterion)(**criterion_kwargs(case))
    takes_distances = case.criterion in ("CACLoss", "CenterLoss", "MCHADLoss")

    placed_on = []  # the device the module was moved to: checked per call, without a state_dict per step

    def fn(z, y):
        if placed_on != [z.device]:
            module.to(z.device)
            placed_on[:] = [z.device]
        return module(module.distance(z), y) if takes_distances else module(z, y)

    return fn


def vos_criterion(namespace, case, pytorch_ood_queues: bool = False):
    """``fn(logits, targets)`` of one VirtualOutlierSynthesizingRegLoss step with every queue already full.

    The layers (fc (D -> C), logistic regression (1 -> 2), energy weights (C -> 1)), the queue contents and
    the features (B, D) come from seed 0, so every provider starts from the same state; each step then
    updates the queues and synthesises outliers (the providers' RNG draws differ, so no max |Δ| is kept).
    ``pytorch_ood_queues``: fill counts live in pytorch-ood's ``number_dict``, not in ``fill_counts``.
    """
    import torch

    n_classes, n_dim, sample_number = case.classes, int(case.hparams["n_dim"]), int(case.hparams["sample_number"])
    torch.manual_seed(0)
    fc = torch.nn.Linear(n_dim, n_classes)
    module = namespace.VirtualOutlierSynthesizingRegLoss(
        torch.nn.Linear(1, 2), torch.nn.Linear(n_classes, 1), fc, sample_number=sample_number
    )
    with torch.no_grad():
        module.data_dict.copy_(torch.randn(n_classes, sample_number, n_dim))
    if pytorch_ood_queues:
        module.number_dict = {c: sample_number for c in range(n_classes)}
    else:
        module.fill_counts.fill_(sample_number)
    features = torch.randn(case.shape[0], n_dim)

    def fn(x, y):
        nonlocal features
        if features.device != x.device:
            module.to(x.device)
            features = features.to(x.device)
        return module(x, features.to(x.dtype), y)

    return fn


def build_reference(case):
    import oodkernels

    if case.family == "vos":
        return vos_criterion(oodkernels.reference, case)
    if case.family == "centers":
        return center_criterion(oodkernels.reference, case)
    if case.family == "rows":
        module = getattr(oodkernels.reference, case.criterion)(**criterion_kwargs(case))
        return lambda x, y: module(x, y)
    score = getattr(oodkernels.reference.scores, case.criterion)
    return _score_call(score, case)


def _score_call(score, case):
    """``fn(logits)`` of a score; the weighted energy gets ``weights = ones(C)`` (built once per device)."""
    hparams = dict(case.hparams)
    if case.criterion != "weighted_energy":
        return lambda x: score(x, **hparams)
    import torch

    cache = {}

    def call(x):
        if x.device not in cache:
            cache[x.device] = torch.ones(x.shape[1], device=x.device)
        return score(x, cache[x.device], **hparams)

    return call


def build_provider(name: str, case, pytorch_ood):
    import torch

    import oodkernels

    if case.family == "vos":
        if name == "oodkernels":
            return vos_criterion(oodkernels.loss, case)
        if name == "reference":
            return build_reference(case)
        if name == "pytorch-ood":
            if pytorch_ood is None:
                raise Unavailable("pytorch-ood 0.4.0 is not importable")
            return vos_criterion(pytorch_ood.loss, case, pytorch_ood_queues=True)
        if name == "reference-compiled":
            raise Unavailable("a stateful step with RNG draws and queue updates is not a compiled-graph case")
    if case.family == "centers":
        if name == "oodkernels":
            return center_criterion(oodkernels.loss, case)
        if name == "reference":
            return build_reference(case)
        if name == "reference-compiled":
            return torch.compile(center_criterion(oodkernels.reference, case), dynamic=False)
        if name == "pytorch-ood":
            if pytorch_ood is None:
                raise Unavailable("pytorch-ood 0.4.0 is not importable")
            return center_criterion(pytorch_ood.loss, case)
    if name == "oodkernels":
        if case.family == "rows":
            module = getattr(oodkernels.loss, case.criterion)(**criterion_kwargs(case))
            return lambda x, y: module(x, y)
        score = getattr(oodkernels.scores, case.criterion)
        return _score_call(score, case)
    if name == "oodkernels-cpp":
        if not oodkernels._cpp.available():
            raise Unavailable(f"C++ extension unavailable: {oodkernels._cpp.status()}")
        inner = build_provider("oodkernels", case, pytorch_ood)

        def forced(*inputs):
            # the forward picks the backend; its backward follows the saved op, which dispatches alike
            saved = os.environ.get("OODKERNELS_BACKEND")
            os.environ["OODKERNELS_BACKEND"] = "cpp"
            try:
                return inner(*inputs)
            finally:
                if saved is None:
                    os.environ.pop("OODKERNELS_BACKEND", None)
                else:
                    os.environ["OODKERNELS_BACKEND"] = saved

        return forced
    if name == "reference":
        return build_reference(case)
    if name == "reference-compiled":
        if case.family == "rows":
            module = getattr(oodkernels.reference, case.criterion)(**criterion_kwargs(case))
            compiled = torch.compile(module, dynamic=False)
            return lambda x, y: compiled(x, y)
        score = getattr(oodkernels.reference.scores, case.criterion)
        compiled = torch.compile(_score_call(score, case), dynamic=False)
        return compiled
    if name == "pytorch-ood":
        if pytorch_ood is None:
            raise Unavailable("pytorch-ood 0.4.0 is not importable")
        if case.family == "rows":
            cls = getattr(pytorch_ood.loss, case.criterion, None)
            if cls is None:
                raise Unavailable(f"pytorch-ood has no {case.criterion}")
            module = cls(**criterion_kwargs(case))
            return lambda x, y: module(x, y)
        detector = getattr(pytorch_ood.detector, PYTORCH_OOD_SCORES.get(case.criterion, ""), None)
        if case.hparams.get("clip") is False:
            raise Unavailable("pytorch-ood has no exact (unclipped) entropy")
        if detector is None:
            raise Unavailable(f"pytorch-ood has no score {case.criterion}")
        hparams = dict(case.hparams)
        return lambda x: detector.score(x, **hparams)
    raise ValueError(f"unknown provider {name!r}")


def backend_of(provider: str, case, device, info) -> str:
    """What runs the provider: for oodkernels, the backend oodkernels.backend_info() names."""
    import oodkernels
    from bench.cases import OP_NAMES

    if provider == "oodkernels-cpp":
        return "cpp"
    if provider == "reference":
        return "eager"
    if provider == "reference-compiled":
        return "inductor"
    if provider == "pytorch-ood":
        return "eager"
    if case.family == "rows" and getattr(oodkernels.loss, case.criterion) is getattr(
        oodkernels.reference, case.criterion
    ):
        return "reference"  # the criterion class is still the reference class (no fused forward wired in)
    op = OP_NAMES.get(case.criterion)
    try:
        return str(info["operations"][op][device.type])
    except (KeyError, TypeError):
        return "unknown"


# ----------------------------------------------------------------------------------------------
# modes and timing
# ----------------------------------------------------------------------------------------------


def mode_callable(fn, case, mode: str, logits, targets):
    """``(stmt, grad_to_none)`` running ``mode`` of ``fn``; ``stmt`` clears the grad itself on CPU."""
    import torch

    if case.family == "scores":
        if mode == "fwd":
            return (lambda: fn(logits)), []
        if mode == "no-grad":

            def no_grad_score():
                with torch.no_grad():
                    return fn(logits)

            return no_grad_score, []
        raise Unavailable(f"scores have no {mode} mode")

    x = logits.detach().requires_grad_(True)
    if mode == "fwd":
        return (lambda: fn(x, targets)), [x]
    if mode == "no-grad":

        def no_grad_loss():
            with torch.no_grad():
                return fn(logits, targets)

        return no_grad_loss, []
    if mode == "bwd":
        loss = fn(x, targets)
        dy = torch.ones_like(loss) if loss.dim() else None

        def backward():
            x.grad = None
            loss.backward(dy, retain_graph=True)

        return backward, [x]
    if mode == "full":

        def step():
            x.grad = None
            out = fn(x, targets)
            out.backward(torch.ones_like(out) if out.dim() else None)

        return step, [x]
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def quantiles(values, qs=(0.5, 0.2, 0.8)):
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    return [float(v) for v in torch.quantile(t, torch.tensor(qs, dtype=torch.float64))]


def time_cpu(stmt: Callable, min_run_time: float, threads: int) -> list:
    """The per-run times (seconds) of ``Timer.blocked_autorange``."""
    from torch.utils.benchmark import Timer

    measurement = Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time
    )
    return list(measurement.times)


def time_cuda(stmt: Callable, grad_to_none, rep_ms: float) -> list:
    import triton.testing

    out = triton.testing.do_bench(
        stmt, warmup=25, rep=rep_ms, grad_to_none=grad_to_none or None, quantiles=[0.5, 0.2, 0.8]
    )
    return [float(v) for v in out]


def peak_memory_cuda(stmt: Callable, grad_to_none, iters: int = 10) -> list:
    """[p50, p20, p80] in MB of max_memory_allocated above what was allocated before each call (the inputs)."""
    import torch

    peaks = []
    for _ in range(iters):
        for t in grad_to_none:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stmt()
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / 1e6)
    return quantiles(peaks)


def copy_bandwidth(device, min_run_time: float, threads: int, nbytes: int) -> list:
    """Device-to-device copy bandwidth [p50, p20, p80] in GB/s (read + write bytes / time)."""
    import torch

    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    stmt = lambda: dst.copy_(src)  # noqa: E731
    if device.type == "cuda":
        times = time_cuda(stmt, [], 1000 * max(min_run_time, 0.2))
    else:
        stmt()
        times = [1e3 * v for v in quantiles(time_cpu(stmt, min_run_time, threads))]
    moved = 2 * n * 4
    p50, p20, p80 = times
    return [moved / (p50 * 1e-3) / 1e9, moved / (p80 * 1e-3) / 1e9, moved / (p20 * 1e-3) / 1e9]


def gemm_tflops(device, dtype: str, min_run_time: float, n: int = 8192) -> list:
    """The device's matrix-product rate [p50, p20, p80] in TFLOP/s for ``dtype``: ``torch.mm`` of two n x n
    matrices (fp32 in IEEE precision, TF32 off, as the center kernels' default), the FLOP roofline's
    denominator of the center cases (CUDA only)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dtype]
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        p50, p20, p80 = time_cuda(lambda: torch.mm(a, b), [], 1000 * max(min_run_time, 0.2))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    work = 2 * n**3
    return [work / (p50 * 1e-3) / 1e12, work / (p80 * 1e-3) / 1e12, work / (p20 * 1e-3) / 1e12]


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# accuracy: max |Δ| against a float64 evaluation of the reference on the same inputs
# ----------------------------------------------------------------------------------------------


def fp64_truth(case, logits, targets):
    """(value, grad) of the reference in float64 (grad None for scores)."""
    import torch

    if case.family == "vos":
        return None, None  # stateful and random: each provider draws its own outliers
    ref = build_reference(case)
    x = logits.detach().to(torch.float64)
    if case.family == "scores":
        with torch.no_grad():
            return ref(x), None
    x.requires_grad_(True)
    value = ref(x, targets)
    (grad,) = torch.autograd.grad(value, x, torch.ones_like(value) if value.dim() else None)
    return value.detach(), grad


def max_abs(a, b) -> float:
    import torch

    if a is None or b is None:
        return math.nan
    if a.numel() == 0:
        return 0.0
    return float((a.detach().to(torch.float64) - b).abs().max())


def provider_errors(fn, case, logits, targets, truth) -> dict:
    """max |Δ| per mode: the value for fwd / no-grad, the gradient for bwd, both for full."""
    import torch

    value64, grad64 = truth
    if case.family == "vos":
        return {}
    if case.family == "scores":
        err = max_abs(fn(logits), value64)
        return {"fwd": err, "no-grad": err}
    x = logits.detach().requires_grad_(True)
    value = fn(x, targets)
    (grad,) = torch.autograd.grad(value, x, torch.ones_like(value) if value.dim() else None)
    err_value, err_grad = max_abs(value, value64), max_abs(grad, grad64)
    return {"fwd": err_value, "no-grad": err_value, "bwd": err_grad, "full": max(err_value, err_grad)}


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------


def summary(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 120 characters of it)."""
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def run_case(case, args, device, env, pytorch_ood, info) -> tuple[list, list]:
    """Measure every provider and mode of ``case``; returns (csv rows, printable lines)."""
    import torch

    torch.compiler.reset()
    torch.manual_seed(args.seed)
    logits, targets = make_inputs(case, device, args.seed)
    truth = fp64_truth(case, logits, targets)
    modes = [m for m in args.modes if case.family != "scores" or m in SCORE_MODES]
    results = {}  # (provider, mode) -> dict
    skipped = {}
    built = {}
    errors = {}
    for provider in args.providers:
        try:
            fn = build_provider(provider, case, pytorch_ood)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                errors[provider] = provider_errors(fn, case, logits, targets, truth)
            built[provider] = fn
        except Unavailable as exc:
            skipped[provider] = str(exc)
        except Exception as exc:  # e.g. pytorch-ood rejecting bf16: skip the provider for this case
            skipped[provider] = summary(exc)
    for mode in modes:
        stmts = {}
        for provider, fn in built.items():
            try:
                stmt, grad_to_none = mode_callable(fn, case, mode, logits, targets)
                for _ in range(args.warmup):  # compiles (reference-compiled) and fills caches, untimed
                    stmt()
                synchronize(device)
                if device.type == "cuda":
                    times = time_cuda(stmt, grad_to_none, 1000 * args.min_run_time)
                    memory = peak_memory_cuda(stmt, grad_to_none)
                    results[(provider, mode)] = {"time": times, "memory": memory}
                else:
                    stmts[provider] = stmt
            except Unavailable as exc:
                skipped.setdefault(provider, str(exc))
            except Exception as exc:
                skipped[f"{provider}/{mode}"] = summary(exc)
        # CPU: interleave the providers in rounds and pool their per-run times, so that a burst of load from
        # elsewhere on the machine spreads over all providers instead of skewing one ratio
        raw = {provider: [] for provider in stmts}
        for _ in range(args.rounds):
            for provider, stmt in list(stmts.items()):
                try:
                    raw[provider] += time_cpu(stmt, args.min_run_time / args.rounds, args.threads)
                except Exception as exc:
                    skipped[f"{provider}/{mode}"] = summary(exc)
                    del stmts[provider], raw[provider]
        for provider, times in raw.items():
            results[(provider, mode)] = {"time": [1e3 * v for v in quantiles(times)], "memory": [math.nan] * 3}

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    table = []
    for mode in modes:
        for provider in args.providers:
            res = results.get((provider, mode))
            if res is None:
                continue
            p50, p20, p80 = res["time"]
            nbytes = case.bytes_model(mode)
            speedups = {}
            for other, column in SPEEDUP_COLUMNS.items():
                other_res = results.get((other, mode))
                speedups[column] = other_res["time"][0] / p50 if other_res is not None and p50 > 0 else math.nan
            err = errors.get(provider, {}).get(mode, math.nan)
            backend = backend_of(provider, case, device, info)
            config = dict(case.config(), bytes_model=nbytes, warmup=args.warmup, min_run_time=args.min_run_time)
            if device.type == "cpu":
                config["threads"] = args.threads
                config["rounds"] = args.rounds
            gbps = [nbytes / (t * 1e-3) / 1e9 for t in (p50, p80, p20)]  # p20 of GB/s comes from p80 of time
            metrics = [("time", "ms", [p50, p20, p80]), ("bandwidth", "GB/s", gbps)]
            flops = case.flops_model(mode)
            if flops:
                config["flops_model"] = flops
                metrics.append(("compute", "TFLOP/s", [flops / (t * 1e-3) / 1e12 for t in (p50, p80, p20)]))
            roof = [math.nan] * 3
            if device.type == "cuda" and env["copy_gbps"]:
                # the roofline time: the bytes at the copy bandwidth, or the matrix products at the measured
                # GEMM rate of the case's dtype, whichever is longer (KERNEL_GUIDE §5)
                floor_ms = nbytes / (env["copy_gbps"] * 1e9) * 1e3
                gemm = env["gemm_tflops"].get(case.dtype) if flops else None
                if gemm:
                    floor_ms = max(floor_ms, flops / (gemm * 1e12) * 1e3)
                    config["gemm_tflops"] = gemm
                roof = [100.0 * floor_ms / t for t in (p50, p80, p20)]
                metrics.append(("roofline", "%", roof))
            metrics.append(("peak_memory", "MB", res["memory"]))
            for metric, unit, (q50, q20, q80) in metrics:
                rows.append(
                    {
                        "case": case.name,
                        "provider": provider,
                        "backend": backend,
                        "mode": mode,
                        "metric": metric,
                        "unit": unit,
                        "x_name": case.x_name,
                        "x_value": case.x_value,
                        "p50": q50,
                        "p20": q20,
                        "p80": q80,
                        "config_json": json.dumps(config, sort_keys=True),
                        "device": env["device"],
                        "torch": env["torch"],
                        "triton": env["triton"],
                        "cuda": env["cuda"],
                        "git_commit": env["git_commit"],
                        "timestamp": stamp,
                        "max_abs_err": err,
                        **speedups,
                    }
                )
            table.append((provider, backend, mode, p50, p20, p80, gbps[0], roof[0], res["memory"][0], err, speedups))

    lines = format_header(case, device)
    lines += format_table(table, cuda=device.type == "cuda")
    for provider, reason in skipped.items():
        lines.append(f"  skipped {provider}: {reason}")
    return rows, lines


def geomean_lines(rows) -> list:
    """Geometric means over the cases of each oodkernels provider's speed-ups (time rows), per mode: the form
    of SPEC §5's targets (e.g. CPU: full >= 3x pytorch-ood eager and >= 1.2x the compiled reference)."""
    groups = {}
    for row in rows:
        if row["metric"] != "time" or not row["provider"].startswith("oodkernels"):
            continue
        for column in SPEEDUP_COLUMNS.values():
            value = row[column]
            if isinstance(value, float) and value > 0 and math.isfinite(value):
                groups.setdefault((row["provider"], row["mode"], column), []).append(value)
    lines = ["\ngeometric mean of speed-ups over the cases (provider, mode: vs <baseline> [cases])"] if groups else []
    for (provider, mode, column), values in sorted(groups.items()):
        mean = math.exp(sum(math.log(v) for v in values) / len(values))
        lines.append(f"  {provider:<15} {mode:<8} {column.replace('speedup_', ''):<28} {mean:6.2f}x  [{len(values)}]")
    return lines


def fmt(value, spec="{:.3g}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return spec.format(value)


def format_header(case, device) -> list:
    mb = case.rows * case.classes * case.itemsize / 1e6
    return [
        f"\n== {case.name}  [{case.family}, {case.criterion}, {tuple(case.shape)} {case.dtype}"
        f"{', channels_last' if case.memory_format == 'channels_last' else ''}, reduction={case.reduction}, "
        f"logits {mb:.3g} MB, {device.type}]",
        f"   unfused reference: {case.note}",
    ]


def format_table(table, cuda: bool) -> list:
    head = f"  {'provider':<19} {'backend':<10} {'mode':<8} {'p50 ms':>9} {'p20-p80 ms':>17} {'GB/s':>7}"
    if cuda:
        head += f" {'%roof':>6} {'peak MB':>8}"
    head += f" {'max|d|':>8} {'x ref':>6} {'x comp':>6} {'x p-ood':>7}"
    lines = [head]
    for provider, backend, mode, p50, p20, p80, gbps, roof, mem, err, sp in table:
        line = f"  {provider:<19} {backend[:10]:<10} {mode:<8} {p50:>9.3f} {f'{p20:.3f}-{p80:.3f}':>17} {fmt(gbps):>7}"
        if cuda:
            line += f" {fmt(roof, '{:.1f}'):>6} {fmt(mem, '{:.1f}'):>8}"
        line += (
            f" {fmt(err, '{:.1e}'):>8} {fmt(sp['speedup_vs_reference'], '{:.2f}'):>6}"
            f" {fmt(sp['speedup_vs_reference_compiled'], '{:.2f}'):>6} {fmt(sp['speedup_vs_pytorch_ood'], '{:.2f}'):>7}"
        )
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------------


def open_results(path: Path, overwrite: bool):
    """Create (or, with overwrite, replace) the CSV with its header; check the header when appending."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not path.exists() or path.stat().st_size == 0:
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()
        return
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != COLUMNS:
        raise SystemExit(f"{path}: its columns differ from this runner's; use --overwrite or another --out")


def device_row(env, case, backend, mode, metric, unit, values, x_value=math.nan, config=None) -> dict:
    """A results row of a device measurement (the copy bandwidth, the GEMM rate): provider ``torch``."""
    p50, p20, p80 = values
    return {
        "case": case,
        "provider": "torch",
        "backend": backend,
        "mode": mode,
        "metric": metric,
        "unit": unit,
        "x_name": "bytes" if mode == "copy" else "",
        "x_value": x_value,
        "p50": p50,
        "p20": p20,
        "p80": p80,
        "config_json": json.dumps(config or {}),
        "device": env["device"],
        "torch": env["torch"],
        "triton": env["triton"],
        "cuda": env["cuda"],
        "git_commit": env["git_commit"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "max_abs_err": math.nan,
        "speedup_vs_reference": math.nan,
        "speedup_vs_reference_compiled": math.nan,
        "speedup_vs_pytorch_ood": math.nan,
    }


def append_rows(path: Path, rows: list) -> None:
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def csv_list(allowed):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
        return items

    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark oodkernels against the reference (eager and compiled) and pytorch-ood 0.4.0.",
    )
    parser.add_argument("--quick", action="store_true", help="only the CPU-friendly quick subset")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--filter", default=None, metavar="REGEX", help="regex searched in the case names")
    parser.add_argument("--family", choices=("rows", "scores", "centers", "vos"), default=None)
    parser.add_argument(
        "--providers", type=csv_list(PROVIDERS), default=list(PROVIDERS), help=f"default: {','.join(PROVIDERS)}"
    )
    parser.add_argument("--modes", type=csv_list(MODES), default=list(MODES), help=f"default: {','.join(MODES)}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder")
    parser.add_argument("--overwrite", action="store_true", help="replace today's results file instead of appending")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per measurement: CPU blocked_autorange min_run_time (default 0.2); CUDA do_bench rep "
        "(default 0.1)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch.get_num_threads())")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per provider and mode (default 3)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="CPU: interleaved rounds over the providers, min-run-time/rounds each, times pooled (default 3)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument(
        "--plot",
        action="store_true",
        help="after the run, write PNG charts next to the results file (speed-up per case and provider, "
        "achieved vs roofline bandwidth; needs matplotlib)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(INTERPRETER_MESSAGE, file=sys.stderr)
        return 2
    args = parse_args(argv)

    from bench import cases as registry

    selected = registry.select(quick=args.quick, family=args.family, pattern=args.filter)
    if args.list:
        for case in selected:
            print(f"{case.name:<55} quick={case.quick!s:<5} bytes(full)={case.bytes_model('full') / 1e6:.3g} MB")
        print(f"{len(selected)} case(s)")
        return 0
    if not selected:
        print("no case matches the selection", file=sys.stderr)
        return 1

    import torch

    import oodkernels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 1
    if args.min_run_time is None:
        args.min_run_time = 0.1 if device.type == "cuda" else 0.2
    if args.rounds < 1:
        print("--rounds: expected at least 1", file=sys.stderr)
        return 1
    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    oodkernels.config.data_checks = False  # no host synchronisation in oodkernels or the reference
    # AOTAutograd donates saved buffers to the compiled backward, which then refuses retain_graph=True (the
    # bwd mode); keep them, as eager autograd does. This affects memory, not the kernels inductor generates.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False

    pytorch_ood, why = (None, "not requested")
    if "pytorch-ood" in args.providers:
        pytorch_ood, why = load_pytorch_ood()
        if pytorch_ood is None:
            print(f"pytorch-ood provider skipped: {why}")

    info = oodkernels.backend_info()
    name = device_name(device)
    env = {
        "device": name if device.type == "cuda" else f"{name} ({args.threads} threads)",
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "",
        "git_commit": git_commit(),
        "copy_gbps": None,
        "gemm_tflops": {},
    }
    out = Path(args.out) / f"{device_slug(device)}_{datetime.date.today().isoformat()}.csv"
    open_results(out, args.overwrite)

    # device-to-device copy bandwidth, once: the roofline's denominator on CUDA, informative on CPU
    copy = copy_bandwidth(device, args.min_run_time, args.threads, (1 << 30) if device.type == "cuda" else (256 << 20))
    env["copy_gbps"] = copy[0]
    copy_bytes = float((1 << 30) if device.type == "cuda" else (256 << 20))
    config = {"threads": args.threads} if device.type == "cpu" else {}
    append_rows(out, [device_row(env, "_device/copy", "copy_", "copy", "bandwidth", "GB/s", copy, copy_bytes, config)])
    if device.type == "cuda":
        # the matrix-product rate per dtype of the selected center cases: the FLOP side of their roofline
        for dtype in sorted({c.dtype for c in selected if c.family == "centers"}):
            rate = gemm_tflops(device, dtype, args.min_run_time)
            env["gemm_tflops"][dtype] = rate[0]
            append_rows(out, [device_row(env, f"_device/gemm_{dtype}", "torch.mm", "gemm", "compute", "TFLOP/s", rate)])
    print(
        f"oodkernels {oodkernels.__version__} | {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"cuda {env['cuda'] or '-'} | commit {env['git_commit']}\n"
        f"copy bandwidth {copy[0]:.1f} GB/s | {len(selected)} case(s) | providers {','.join(args.providers)} | "
        f"modes {','.join(args.modes)} | min_run_time {args.min_run_time}s\nresults -> {out}"
    )

    start = time.perf_counter()
    all_rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-ood's per-call OOD warnings
        for i, case in enumerate(selected, 1):
            case_start = time.perf_counter()
            rows, lines = run_case(case, args, device, env, pytorch_ood, info)
            append_rows(out, rows)
            all_rows += rows
            lines[0] += f"  ({i}/{len(selected)}, {time.perf_counter() - case_start:.1f} s)"
            print("\n".join(lines), flush=True)
    print("\n".join(geomean_lines(all_rows)))
    print(f"\ndone: {len(selected)} case(s) in {time.perf_counter() - start:.1f} s -> {out}")
    if args.plot:
        from bench import report

        mode = "full" if "full" in args.modes else args.modes[0]
        try:
            written = report.plot(report.summarise(report.load(out), mode), out.with_suffix(""))
        except ImportError:
            print("--plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
            return 1
        print("\n".join(f"chart -> {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
