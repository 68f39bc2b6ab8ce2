"""ModelWatcher: follow MLflow aliases, load and check new versions off the loop, swap them in."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from features.spec import FeatureSpec
from inference.batcher import MicroBatcher
from inference.engines import GpuPolicy
from inference.registry import (
    LoadedModel,
    VersionRef,
    fetch_golden,
    fetch_version,
    open_client,
    resolve_alias,
)
from inference.trees import KernelCompiler
from inference.validation import GoldenRows, ModelContract, ValidationPolicy, validate
from tickserve.errors import ModelNotFound, ModelRejected
from tickserve.metrics import BuildInfo

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"

REJECTIONS = Counter(
    "model_rejections_total", "Model versions that failed a serving check", ["role", "reason"]
)
SWAPS = Counter("model_swaps_total", "Model versions swapped in", ["role"])
POLL_ERRORS = Counter("model_poll_errors_total", "Registry polls that failed")
ROLLBACKS = Counter(
    "model_rollbacks_total",
    "Champions rolled back because too many of their scores were not finite",
)
SERVING = Gauge("model_serving_version", "Version number being served", ["role"])
# rejection reasons that say the registry's store did not answer, not that the version
# is bad: such a version is fetched again at the next poll instead of refused
UNREACHABLE = frozenset({"download"})


@dataclass(frozen=True, slots=True)
class WatcherConfig:
    """What to follow and how often.

    Attributes:
        tracking_uri: MLflow tracking/registry URI.
        name: Registered model name.
        alias: Alias served to `signals` (champion).
        challenger_alias: Alias scored in shadow ("" for none).
        poll_interval_s: Seconds between registry polls.
        prefer_gpu: Ask for CUDA when it is usable.
        policy: The serving checks' tolerances and budgets.
        onnx_threads: ONNX Runtime intra-op threads per session.
        numba_kernels: Score tree ensembles with `inference.trees` and logistic
            regressions with `inference.linear` where they cover them.
        tensorrt: Put TensorRT before CUDA where it is usable.
        max_non_finite_rate: A champion whose share of non-finite scores passes this
            (once it scored `min_rows_for_rate` rows) is rolled back to the version
            it replaced.
        min_rows_for_rate: Rows scored before the rate counts.
        gpu: Where a GPU is usable: CUDA graphs or not, and the largest batch.
        max_model_bytes: A version whose ONNX file is larger is refused (reason
            `size`) before it is downloaded, so it never sits in memory beside the
            serving one.
    """

    tracking_uri: str
    name: str
    alias: str = "champion"
    challenger_alias: str = ""
    poll_interval_s: float = 1.0
    prefer_gpu: bool = True
    policy: ValidationPolicy = ValidationPolicy()
    onnx_threads: int = 1
    numba_kernels: bool = True
    tensorrt: bool = False
    max_non_finite_rate: float = 0.01
    min_rows_for_rate: int = 1000
    gpu: GpuPolicy = GpuPolicy()
    max_model_bytes: int = 512 * 2**20


@dataclass(frozen=True, slots=True)
class SwapEvent:
    """One reference swap, as the batcher saw it (wall-clock ns)."""

    at_ns: int
    role: str
    version: str
    previous: str


class ModelWatcher:
    """Polls the registry; a new version serves only after `validate` passed in a thread."""

    def __init__(
        self, config: WatcherConfig, spec: FeatureSpec, build: BuildInfo | None = None
    ) -> None:
        """Nothing is contacted until `load_initial` or `run`; `build` follows the champion."""
        self.config = config
        self.spec = spec
        self.build = build
        self.contract: ModelContract | None = None
        self.history: list[SwapEvent] = []
        self._client: object | None = None
        self._checked: OrderedDict[str, LoadedModel] = OrderedDict()
        self._rejected: dict[str, str] = {}  # role -> version the alias still points at
        self._woken = asyncio.Event()  # binds to the loop that first waits on it
        # registry calls, downloads and checks run here, at a lower OS priority than
        # the event loop's thread: on a busy machine the loop keeps its core
        self._background = ThreadPoolExecutor(
            1, thread_name_prefix="model-watcher", initializer=_lower_thread_priority
        )
        self._compiler = KernelCompiler()

    def _registry(self) -> object:
        if self._client is None:
            self._client = open_client(self.config.tracking_uri)
        return self._client

    def load_initial(self) -> LoadedModel:
        """Resolve, load and check the champion (blocking: call before serving starts).

        Raises:
            ModelNotFound: The alias points nowhere.
            ModelRejected: The version fails a check; the process must not serve it.
            RegistryError: The registry failed to answer.
        """
        ref = resolve_alias(self._registry(), self.config.name, self.config.alias)
        model = self._load_checked(ref, serving=False)
        SERVING.labels(CHAMPION).set(_as_number(model.version))
        if self.build is not None:
            self.build.serving(model.name, model.version)
        return model

    def _load_checked(self, ref: VersionRef, serving: bool = True) -> LoadedModel:
        """Fetch one version and run every check (runs in a worker thread).

        While `serving`, a tree kernel is compiled in a child process (see
        `KernelCompiler`), so the event loop does not stall on it.
        """
        cfg = self.config
        kernel: bool | KernelCompiler = cfg.numba_kernels
        if cfg.numba_kernels and serving:
            kernel = self._compiler
        model = fetch_version(
            cfg.tracking_uri,
            ref,
            self.spec,
            cfg.prefer_gpu,
            cfg.onnx_threads,
            kernel,
            cfg.tensorrt,
            cfg.gpu,
            cfg.max_model_bytes,
        )
        golden = GoldenRows.parse(fetch_golden(cfg.tracking_uri, ref), self.spec.n_features)
        contract = validate(model.scorer, golden, cfg.policy, self.contract)
        if self.contract is None:
            self.contract = contract
        self.remember(model)
        logger.info(
            "model version checked",
            extra={
                "model": ref.name,
                "version": ref.version,
                "alias": ref.alias,
                "provider": model.scorer.provider,
            },
        )
        return model

    def wake(self) -> None:
        """Poll now instead of at the end of the interval (call on the loop `run` runs on).

        A wake during a poll causes one more poll after it, so an alias moved while the
        registry was being read is still seen. Wakes between two polls count as one.
        """
        self._woken.set()

    async def run(self, batcher: MicroBatcher, stop: asyncio.Event) -> None:
        """Poll every `poll_interval_s`, or at once after `wake`, until `stop` is set."""
        if self.config.numba_kernels:  # the compiler's child process starts now, not mid-swap
            await asyncio.get_running_loop().run_in_executor(self._background, self._compiler.start)
        try:
            while not stop.is_set():
                self._woken.clear()  # this poll answers every wake so far
                await self.poll_once(batcher)
                await _first_of(stop, self._woken, self.config.poll_interval_s)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the kernel compiler's child process, if one was started."""
        self._compiler.close()

    async def poll_once(self, batcher: MicroBatcher) -> None:
        """Follow the champion (and challenger) alias once; never raises."""
        self.roll_back_if_failing(batcher)
        roles = [(CHAMPION, self.config.alias)]
        if self.config.challenger_alias:
            roles.append((CHALLENGER, self.config.challenger_alias))
        for role, alias in roles:
            try:
                await self._follow(batcher, role, alias)
            except Exception:  # the registry may be briefly unreachable: keep serving
                POLL_ERRORS.inc()
                logger.exception("registry poll failed", extra={"role": role, "alias": alias})

    async def _follow(self, batcher: MicroBatcher, role: str, alias: str) -> None:
        loop = asyncio.get_running_loop()
        name = self.config.name
        try:
            ref = await loop.run_in_executor(
                self._background, resolve_alias, self._registry(), name, alias
            )
        except ModelNotFound:
            if role == CHALLENGER and batcher.challenger is not None:
                self._apply(batcher, role, None)
            elif role == CHAMPION:
                POLL_ERRORS.inc()
                logger.warning("champion alias is gone; still serving", extra={"alias": alias})
            return
        current = batcher.model if role == CHAMPION else batcher.challenger
        if current is not None and current.version == ref.version:
            self._rejected.pop(role, None)
            return
        if self._rejected.get(role) == ref.version:
            return  # already refused; the alias has not moved since
        model = self._checked.get(ref.version)
        if model is None:
            try:
                model = await loop.run_in_executor(self._background, self._load_checked, ref)
            except Exception as exc:  # any failure to load or check means: never serve it
                reason = exc.reason if isinstance(exc, ModelRejected) else "error"
                if reason in UNREACHABLE:
                    # the registry's store did not answer: the version was never judged,
                    # so it is fetched again at the next poll (tests/faults/test_registry.py)
                    POLL_ERRORS.inc()
                    logger.warning(
                        "model version not fetched; retried at the next poll, previous "
                        "version keeps serving",
                        extra={
                            "model": name,
                            "version": ref.version,
                            "alias": alias,
                            "role": role,
                            "detail": str(exc),
                        },
                    )
                    return
                self._rejected[role] = ref.version
                REJECTIONS.labels(role, reason).inc()
                logger.error(
                    "model version rejected; previous version keeps serving",
                    extra={
                        "model": name,
                        "version": ref.version,
                        "alias": alias,
                        "role": role,
                        "reason": reason,
                        "detail": str(exc),
                        "serving": current.version if current else None,
                    },
                )
                return
        self._rejected.pop(role, None)
        self._apply(batcher, role, dataclasses.replace(model, alias=alias))

    def remember(self, model: LoadedModel) -> None:
        """Keep a checked version loaded until it neither serves nor is the fallback."""
        self._checked[model.version] = model

    def fallback(self) -> str | None:
        """The version the champion replaced, kept loaded for `roll_back_if_failing`.

        None right after a rollback (a return to the version the one before replaced):
        the version rolled back from is not something to go back to.
        """
        events = [e for e in self.history if e.role == CHAMPION]
        if not events:
            return None
        if len(events) > 1 and events[-1].version == events[-2].previous:
            return None
        return events[-1].previous or None

    def release(self, batcher: MicroBatcher) -> None:
        """Drop every checked version that neither serves nor is the fallback.

        The loaded model (its ONNX Runtime session, kernels and buffers) is referenced
        from here and from the batcher only, so its memory goes back to the allocator
        here (docs/architecture.md, "Model memory").
        """
        keep = {batcher.model.version, self.fallback()}
        if batcher.challenger is not None:
            keep.add(batcher.challenger.version)
        for version in [v for v in self._checked if v not in keep]:
            del self._checked[version]
            logger.info("model version released", extra={"version": version})

    def refused(self, role: str) -> str | None:
        """The version `role`'s alias points at that is refused until the alias moves."""
        return self._rejected.get(role)

    def roll_back_if_failing(self, batcher: MicroBatcher) -> bool:
        """Swap the champion back to the version it replaced if its scores fail too often.

        The failing version is refused from then on, as a rejected one is: the alias
        must move to another version before anything new serves.
        """
        health, cfg = batcher.health, self.config
        if health.scored < cfg.min_rows_for_rate or health.rate <= cfg.max_non_finite_rate:
            return False
        failing = batcher.model
        previous = self.fallback()
        model = self._checked.get(previous) if previous else None
        self._rejected[CHAMPION] = failing.version
        REJECTIONS.labels(CHAMPION, "non_finite").inc()
        detail = {
            "model": failing.name,
            "version": failing.version,
            "non_finite_rate": round(health.rate, 4),
            "scored": health.scored,
            "rolled_back_to": model.version if model else None,
        }
        if model is None:  # nothing checked to go back to: keep serving, loudly
            logger.error(
                "champion scores non-finite values; no version to roll back to", extra=detail
            )
            batcher.health.scored = batcher.health.non_finite = 0  # look again after as many rows
            return False
        logger.error("champion scores non-finite values: rolled back", extra=detail)
        ROLLBACKS.inc()
        self._apply(batcher, CHAMPION, model)
        return True

    def _apply(self, batcher: MicroBatcher, role: str, model: LoadedModel | None) -> None:
        """Swap on the loop thread: the batcher scores nothing while this runs."""
        if role == CHAMPION:
            assert model is not None
            previous = batcher.swap(model).version
            if self.build is not None:
                self.build.serving(model.name, model.version)
        else:
            previous = batcher.challenger.version if batcher.challenger else ""
            batcher.set_challenger(model)
        version = model.version if model else ""
        self.history.append(SwapEvent(time.time_ns(), role, version, previous))
        SWAPS.labels(role).inc()
        SERVING.labels(role).set(_as_number(version))
        self.release(batcher)


async def _first_of(a: asyncio.Event, b: asyncio.Event, timeout_s: float) -> None:
    """Return when either event is set or after `timeout_s`, whichever comes first."""
    waiters = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _lower_thread_priority() -> None:
    """Nice the calling thread by 10 (on Linux, niceness is per thread)."""
    with contextlib.suppress(OSError, AttributeError):  # not permitted, or not Linux
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _as_number(version: str) -> float:
    """MLflow versions are integers; anything else shows as -1 on the gauge."""
    return float(version) if version.isdigit() else -1.0
