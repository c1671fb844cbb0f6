"""Ray Serve: this server's FastAPI app as the ingress, N engine replicas behind it, persona-aware routing.

Everything Ray-specific lives in this module (Ray's multiplex API is beta and moving). Two deployments:

- `engine`: one engine per replica, in a process of its own as in `reft-serve serve` (`engine_process`; with
  `engine_process=false` on a thread of the replica: beside Ray's event loop its forwards ran ~1.2x slower on a
  2-core CPU). A request arrives with its artifact digest as Ray's
  multiplexed model id; `@serve.multiplexed` keeps decoded interventions per replica (read by digest from the store
  the settings select), and Ray's router prefers replicas that already hold that id, falling back to any replica
  when those are at `max_ongoing_requests`. A persona is KB-sized and loads in milliseconds, so that affinity is
  an optimisation: a hot persona spreads over every replica that gets busy. Base-model requests carry no id and
  are load-balanced. `max_ongoing_requests` is the engine's own running + waiting bound (Ray's default of 5 would
  starve batching); `serve.batch` is not used (it splits batches by model id; the engine mixes personas in one
  batch). `check_health` fails once the engine has died, so Ray replaces the replica.
- `ingress`: `create_app` with a `RayEngine` as its engine: auth, limits, tokenization, name -> digest resolution,
  quotas and the store stay exactly as in one process; only the engine calls cross to the replicas, streamed.

Training needs a PostgreSQL store on Ray: the ingress validates, tokenizes and queues a job in it (its engine
handle runs none), and each engine replica runs a `TrainingManager` with a `JobWorker` over its own engine, which
claims jobs from the queue like any replica of a multi-replica deployment (docs/deployment.md): leases, retries
on another replica when one dies, cancel and events through the store. With a local store the engine replicas
cannot share it, so POST /v1/trainings answers 501. Start with `reft-serve serve --ray` (`run`) or `serve deploy`
with `build`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import ray
from prometheus_client import Counter, Gauge
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from reft_core.base_model import load_tokenizer, model_id_for, resolve_model_dir
from reft_core.intervention import Intervention
from adapters_store.jobs import open_jobs
from adapters_store.tenants import open_tenants
from server.app import StartedEngine, create_app, open_artifact_store, start_engine
from server.auth import tenant_limits
from server.engine.engine import Engine, TrainingTask
from server.engine.remote import ModelInfo, RemoteEngine
from server.engine.sequence import EventSink
from server.engine.types import (
    ComposedRef, ErrorKind, FinishReason, GenerationEvent, GenerationRequest, InterventionRef,
)
from server.generation import LoopDispatcher
from server.job_worker import JobWorker
from server.metrics import Metrics
from server.registry import InterventionRegistry
from server.settings import Settings
from server.training import TrainingManager

log = logging.getLogger("reft_serve.ray")
ENGINE = "engine"  # deployment names inside the application
INGRESS = "ingress"
TRAINING_UNAVAILABLE = (
    "training on the Ray Serve deployment needs a PostgreSQL store (--store postgresql://...), from which its engine "
    "replicas claim jobs; or train with `reft-serve train` or a single-process server, then upload the artifact"
)
# How often the ingress reads how many engine replicas are running. `serve.status()` makes Ray's controller build
# every deployment's details (pydantic models, a pickled router class): polled every second, that alone took 2% of
# a core on an idle 2-core machine (ingress + controller; more under load), cycles the engine needs. A failed
# replica call asks for a reading at once and for a reading every second for a minute (Ray notices a death and
# restarts the replica on its own schedule), as does a reading of no replica running, so /ready still follows
# deaths and restarts within about a second.
HEALTH_POLL_S = 5.0
HEALTH_POLL_DOWN_S = 1.0
WATCH_CLOSELY_S = 60.0


@dataclass(frozen=True)
class RayOptions:
    """How the application is laid out on the cluster (the server's own limits stay in `Settings`)."""

    replicas: int = 1
    replica_cpus: float = 1.0  # Ray CPUs per engine replica (fractions share a machine's cores)
    replica_gpus: float = 0.0  # GPUs per engine replica (1 on a GPU cluster: one engine per GPU)
    app_name: str = "reft-serve"
    health_check_period_s: float = 10.0

    def __post_init__(self) -> None:
        assert self.replicas >= 1 and self.replica_cpus >= 0 and self.replica_gpus >= 0, self


def replica_capacity(settings: Settings) -> int:
    """Requests one engine replica holds at once: its batch plus its queue (Ray's `max_ongoing_requests`)."""
    return settings.max_running + settings.max_waiting_requests


# -- the engine deployment ---------------------------------------------------------------------------------------

class EngineReplica:
    """One engine per replica: loads the model, serves streamed generations, reports its health to Ray."""

    def __init__(self, settings: Settings) -> None:
        # the replica's engine metrics stay in the replica (the ingress's /metrics counts requests and tokens)
        started = start_engine(settings, None, Metrics())
        self._engine = started.engine
        self._store = open_artifact_store(settings, started.fingerprint)
        self._info = model_info(started)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._loads = 0  # interventions this replica has read from the store (multiplex cache misses)
        self._training = training_replica(settings, started) if settings.postgres_store else None

        async def load(digest: str) -> Intervention:
            self._loads += 1
            artifact = await asyncio.to_thread(self._store.load_digest, digest)
            return artifact.intervention

        # set up per instance: the cache size is a setting (the decorator's argument would fix it at import);
        # as many decoded interventions as the bank keeps resident, so Ray's view of "loaded" matches the bank's
        self._intervention = serve.multiplexed(max_num_models_per_replica=settings.resident_interventions)(load)

    def info(self) -> ModelInfo:
        return self._info

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes it replace the replica."""
        if not self._engine.running:
            raise RuntimeError(f"the engine stopped: {self._engine.failure or 'stopped'}")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:
        """Yields (replica id, loads so far) first, then lists of events until the final one. Closing the stream
        early (the client left, or the ingress cancelled) cancels the request in the engine."""
        if request.intervention is not None:
            try:
                loaded = [replace(part, intervention=await self._intervention(part.key)) for part in request.parts]
            except Exception as exc:  # noqa: BLE001 - e.g. deleted since the ingress resolved it: fail this request
                yield self._replica, self._loads
                yield [GenerationEvent(text="", token_ids=(), finish_reason=FinishReason.ERROR,
                                       error=f"the intervention could not be loaded: {exc}",
                                       error_kind=ErrorKind.INTERNAL, prompt_tokens=len(request.prompt_ids))]
                return
            request = replace(request, intervention=_with_parts(request.intervention, loaded))
        yield self._replica, self._loads
        dispatcher = LoopDispatcher(asyncio.get_running_loop())
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self._engine.submit(request, lambda event: dispatcher.post(queue, event))
        finished = False
        try:
            while not finished:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                finished = events[-1].finish_reason is not None
                yield events
        finally:
            if not finished:
                self._engine.cancel(request.request_id)

    def __del__(self) -> None:
        training = getattr(self, "_training", None)
        if training is not None:
            training.close()  # claim nothing more; a job running here is released as the engine stops
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.stop()


def model_info(started: StartedEngine) -> ModelInfo:
    """What the ingress learns about the model from a replica, whichever way its engine runs."""
    engine = started.engine
    if isinstance(engine, RemoteEngine):
        assert engine.info is not None  # started
        return engine.info
    assert isinstance(engine, Engine)
    parameter = next(engine.model.parameters())
    return ModelInfo(started.fingerprint, started.dims, engine.max_context, str(parameter.device),
                     str(parameter.dtype))


def training_replica(settings: Settings, started: StartedEngine) -> TrainingManager:
    """The engine replica's side of training: a TrainingManager over its engine, claiming jobs from the shared
    queue (it registers results in the store and checks the tenant's quota there, as the ingress would)."""
    store = open_artifact_store(settings, started.fingerprint)
    tenants = open_tenants(settings.state_location(""))
    registry = InterventionRegistry(store, started.fingerprint, settings,
                                    lambda tenant: tenant_limits(tenants, tenant),
                                    base_model_id=settings.model_id or started.base_model_id)
    jobs = open_jobs(settings.state_location("jobs"), lease_s=settings.job_lease_s,
                     max_attempts=settings.job_max_attempts)
    manager = TrainingManager(started.engine, registry, started.tokenizer, jobs, settings, started.dims)
    manager.worker = JobWorker(manager)
    return manager


# -- the ingress's engine handle ----------------------------------------------------------------------------------

class RayEngine:
    """The `EngineHandle` the ingress's app holds: each request is a streamed call to the engine deployment."""

    def __init__(self, handle: DeploymentHandle, info: ModelInfo, metrics: Metrics, replicas: int,
                 running_replicas: Callable[[], int]) -> None:
        """`running_replicas` reads how many engine replicas Ray reports running (`running_engine_replicas`)."""
        self._handle, self.info, self._replicas = handle, info, replicas
        self._running_replicas = running_replicas
        self._calls: dict[str, tuple[asyncio.Task[None], list[Any]]] = {}  # request id -> pump task, its stream
        self._draining = False
        self._healthy = replicas  # replaced by the monitor's first reading
        self._stop = threading.Event()
        self._recheck = threading.Event()  # a replica call failed: read the replicas' status now
        self._watch_closely_until = 0.0  # monotonic time; after a failure, poll every second for a while
        # per-replica series: bounded by replicas x restarts (replica ids are Ray's, never user input)
        self._served = Counter("reft_ray_replica_requests_total", "Generation requests served by each engine replica",
                               ["replica"], registry=metrics.registry)
        self._loads = Gauge("reft_ray_replica_intervention_loads", "Interventions each engine replica has loaded",
                            ["replica"], registry=metrics.registry)
        self._healthy_gauge = Gauge("reft_ray_healthy_engine_replicas", "Engine replicas Ray reports running",
                                    registry=metrics.registry)
        self._monitor = threading.Thread(target=self._watch, name="reft-ray-health", daemon=True)
        self._monitor.start()

    # -- EngineHandle -------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """At least one engine replica is running (Ray restarts failed ones: `/ready` follows)."""
        return self._healthy > 0 and not self._stop.is_set()

    @property
    def failure(self) -> str | None:
        return None  # a dead replica is Ray's to replace; the ingress itself never needs a restart for it

    @property
    def max_context(self) -> int:
        return self.info.max_context

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Start the streamed call on the caller's event loop (handlers call this from theirs)."""
        if self._draining or self._stop.is_set():
            sink(_failed(request, ErrorKind.SHUTDOWN, "the server is shutting down"))
            return
        stream: list[Any] = []
        task = asyncio.get_running_loop().create_task(self._pump(request, sink, stream))
        self._calls[request.request_id] = (task, stream)
        task.add_done_callback(lambda _: self._calls.pop(request.request_id, None))

    def cancel(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None:
            task, stream = call
            for response in stream:
                response.cancel()  # Ray cancels the replica's generator, which cancels the engine request
            task.cancel()

    def submit_training(self, task: TrainingTask) -> None:
        # not reached: the ingress only queues jobs (the engine replicas claim them), or answers 501
        raise AssertionError("the Ray ingress runs no training job")

    def cancel_training(self, job_id: str) -> None:
        pass  # the ingress runs no job: a cancel goes through the store to the engine replica running it

    def drain(self) -> None:
        self._draining = True

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._recheck.set()
        self._monitor.join(timeout)

    # -- streaming ----------------------------------------------------------------------------------------------------
    async def _pump(self, request: GenerationRequest, sink: EventSink, stream: list[Any]) -> None:
        options: dict[str, Any] = {"stream": True}
        if request.intervention is not None:  # the replica loads each part by digest: only digests cross
            options["multiplexed_model_id"] = request.parts[0].key  # a composition is routed by its first part
            bare = [replace(part, intervention=None) for part in request.parts]
            request = replace(request, intervention=_with_parts(request.intervention, bare))
        finished = False
        try:
            response = self._handle.options(**options).generate.remote(request)
            stream.append(response)
            replica: str | None = None
            async for item in response:
                if replica is None:
                    replica, loads = item
                    self._served.labels(replica=replica).inc()
                    self._loads.labels(replica=replica).set(loads)
                    continue
                for event in item:
                    finished = event.finish_reason is not None
                    sink(event)
        except asyncio.CancelledError:
            raise  # the consumer left (GenerationService cancelled it): nobody is waiting for an event
        except BackPressureError:
            sink(_failed(request, ErrorKind.OVERLOADED, "every engine replica is at capacity; retry shortly"))
            finished = True
        except Exception as exc:  # noqa: BLE001 - a replica died or failed mid-request: fail this request only
            log.warning("engine replica call failed", extra={"request": request.request_id, "error": repr(exc)})
            self._watch_closely_until = time.monotonic() + WATCH_CLOSELY_S
            self._recheck.set()
            sink(_failed(request, ErrorKind.ENGINE_DEAD, f"the engine replica serving this request failed "
                         f"({type(exc).__name__}); retry the request"))
            finished = True
        if not finished:
            sink(_failed(request, ErrorKind.ENGINE_DEAD, "the engine replica ended the request without a result"))

    # -- health -------------------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            closely = self._healthy == 0 or time.monotonic() < self._watch_closely_until
            self._recheck.wait(HEALTH_POLL_DOWN_S if closely else HEALTH_POLL_S)
            self._recheck.clear()
            if self._stop.is_set():
                return
            try:
                self._healthy = self._running_replicas()
            except Exception as exc:  # noqa: BLE001 - the controller may be restarting: keep the last reading
                log.warning("could not read the engine replicas' status", extra={"error": repr(exc)})
                continue
            self._healthy_gauge.set(self._healthy)


def running_engine_replicas(app_name: str) -> Callable[[], int]:
    """Reads how many engine replicas of the application Ray reports running."""
    def read() -> int:
        deployments = serve.status().applications[app_name].deployments
        return int(deployments[ENGINE].replica_states.get("RUNNING", 0))

    return read


def _with_parts(ref: InterventionRef | ComposedRef, parts: list[InterventionRef]) -> InterventionRef | ComposedRef:
    """`ref` with its parts replaced (weights dropped for the wire, or loaded on the replica)."""
    return ComposedRef(tuple(parts)) if isinstance(ref, ComposedRef) else parts[0]


def _failed(request: GenerationRequest, kind: ErrorKind, message: str) -> GenerationEvent:
    return GenerationEvent(text="", token_ids=(), finish_reason=FinishReason.ERROR, error=message, error_kind=kind,
                           prompt_tokens=len(request.prompt_ids))


def start_ray_engine(settings: Settings, metrics: Metrics, handle: DeploymentHandle, options: RayOptions
                     ) -> StartedEngine:
    """The ingress's `EngineStarter`: the tokenizer here, the model facts from an engine replica (which loaded it)."""
    tokenizer = load_tokenizer(resolve_model_dir(settings.model, settings.model_cache_dir))
    info: ModelInfo = handle.info.remote().result(timeout_s=600)
    app_name = serve.get_replica_context().app_name  # as deployed (`serve deploy` may name it otherwise)
    engine = RayEngine(handle, info, metrics, options.replicas, running_engine_replicas(app_name))
    return StartedEngine(engine, tokenizer, info.fingerprint, info.dims, model_id_for(settings.model),
                         capacity=options.replicas * replica_capacity(settings),
                         training_unavailable=training_unavailable(settings), claims_jobs=False)


def training_unavailable(settings: Settings) -> str | None:
    """Why the Ray deployment cannot train with these settings (POST /v1/trainings answers 501), or None."""
    return None if settings.postgres_store else TRAINING_UNAVAILABLE


@serve.ingress()
class Ingress:
    """The existing FastAPI app, built on the replica (`__serve_build_asgi_app__`) around a `RayEngine`."""

    def __init__(self, settings: Settings, engine: DeploymentHandle, options: RayOptions) -> None:
        self._settings, self._engine, self._options = settings, engine, options

    def __serve_build_asgi_app__(self) -> Any:
        def start(settings: Settings, metrics: Metrics) -> StartedEngine:
            return start_ray_engine(settings, metrics, self._engine, self._options)

        return create_app(self._settings, start=start)


# -- building and running the application --------------------------------------------------------------------------

def build_app(settings: Settings, options: RayOptions) -> Any:
    """The Serve application: the ingress bound to the engine deployment."""
    capacity = replica_capacity(settings)
    engine = serve.deployment(
        EngineReplica, name=ENGINE, num_replicas=options.replicas,
        max_ongoing_requests=capacity,
        # requests waiting at the ingress's handle for a replica with room (a burst being assigned, or every replica
        # restarting): the ingress admits at most this many in all, so this bound is a safety net (-> 429)
        max_queued_requests=options.replicas * capacity,
        health_check_period_s=options.health_check_period_s,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
    ).bind(settings)
    ingress = serve.deployment(
        Ingress, name=INGRESS, num_replicas=1,  # one ingress: its registry cache and rate limits live in memory
        max_ongoing_requests=options.replicas * capacity + settings.max_connections,
        ray_actor_options={"num_cpus": 0},  # HTTP and tokenizing; the engines hold the cores
    )
    return ingress.bind(settings, engine, options)


def build(args: dict[str, Any]) -> Any:
    """Application builder for `serve deploy` / KubeRay: `args` holds `Settings` fields plus `replicas`,
    `replica_cpus`, `replica_gpus` (see docs/ray.md); `REFT_SERVE_<FIELD>` variables apply as for `reft-serve serve`
    (the args win), and the admin key comes from $REFT_SERVE_ADMIN_KEY only, never from the config file."""
    from server.cli import setting_overrides

    fields = setting_overrides([], os.environ) | dict(args)
    options = RayOptions(**{name: fields.pop(name) for name in ("replicas", "replica_cpus", "replica_gpus")
                            if name in fields})
    fields.pop("admin_key", None)
    admin_key = os.environ.get("REFT_SERVE_ADMIN_KEY") or None
    return build_app(Settings(**fields, admin_key=admin_key), options)


def run(settings: Settings, options: RayOptions) -> int:
    """`reft-serve serve --ray`: join `RAY_ADDRESS` or start a local cluster, deploy, serve until SIGTERM/SIGINT,
    then remove what this command started (the whole local cluster, or only the application on a joined one)."""
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, options), name=options.app_name, route_prefix="/", blocking=False)
        log.info("serving on Ray", extra={"replicas": options.replicas, "port": settings.port,
                                          "cluster": address or "local"})
        stop.wait()
    finally:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(options.app_name)
        ray.shutdown()
    return 0

