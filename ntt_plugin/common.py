"""What the operators share: importing the library, form pieces, validation, runs with progress.

Nothing here imports the library at module level: the operators import the modules of
:mod:`ntt_core.fiftyone` they need inside their methods, after :func:`require_library`, so
listing and registering the plugin imports no torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fiftyone.operators as foo
import fiftyone.operators.types as types

INSTALL_HINT = "install the library with `pip install -e <repository>` (or `pip install -r requirements.txt`) in the environment that runs FiftyOne"
DEVICES = ("auto", "cuda", "cpu", "mps")
#: Starts every operator's label, so that typing it in the App's operator browser lists them all.
LABEL_PREFIX = "NTT: "
DTYPES = ("auto", "float32", "bfloat16")

logger = logging.getLogger(__name__)


class LibraryMissingError(ImportError):
    """The ``ntt_core`` library (or one of its dependencies) cannot be imported."""


def require_library() -> None:
    """Make ``ntt_core`` importable, or raise a :class:`LibraryMissingError` saying how to install it.

    A plugin folder that holds the whole repository (``fiftyone plugins download``) has the
    library next to ``ntt_plugin/``: it is importable from there without installing it.
    """
    try:
        importlib.import_module("ntt_core.fiftyone.fields")
    except ModuleNotFoundError as error:
        repo = Path(__file__).resolve().parent.parent
        if error.name == "ntt_core" and (repo / "ntt_core").is_dir() and str(repo) not in sys.path:
            sys.path.append(str(repo))
            return require_library()
        raise LibraryMissingError(f"the ntt_core library is not importable ({error}); {INSTALL_HINT}") from None


def product_label(text: str) -> str:
    """An operator's label in the App: :data:`LABEL_PREFIX` and ``text``."""
    return LABEL_PREFIX + text


def form(ctx, title: str, build: Callable) -> types.Property:
    """The operator's form: ``build(ctx, inputs)`` fills ``inputs`` (the library is importable by
    then); a missing library shows as an error in the form."""
    inputs = types.Object()
    try:
        require_library()
    except LibraryMissingError as error:
        invalid(
            inputs.view(
                "library_missing", types.Error(label="The ntt_core library is missing", description=str(error))
            ),
            str(error),
        )
    else:
        build(ctx, inputs)
    return types.Property(inputs, view=types.View(label=title))


def current(ctx, inputs, name: str):
    """The value of input ``name``: the request's, else the input's default (as the App sends it)."""
    value = ctx.params.get(name)
    if value is None and name in inputs.properties:
        return inputs.properties[name].default
    return value


def params_with_defaults(operator, ctx) -> dict:
    """The request's parameters with every missing input set to its form default, so Python
    callers may leave out what the App would fill in."""
    inputs = operator.resolve_input(ctx).type
    values = {name: current(ctx, inputs, name) for name in inputs.properties}
    return {**ctx.params, **{k: v for k, v in values.items() if v is not None}}


def check(prop, test: Callable[[], object]):
    """Run ``test`` (in a form, once the library is importable); a library error
    (:class:`~ntt_core.errors.NttError`) marks ``prop`` invalid with its message. Returns what
    ``test`` returned, or None when it failed."""
    from ntt_core.errors import NttError

    try:
        return test()
    except (NttError, LibraryMissingError) as error:
        invalid(prop, str(error))
        return None


def count_input(ctx, inputs, name: str, label: str, **options):
    """An integer input that must be at least 1, judged by the library's rule with its message
    (FiftyOne's own ``min=1`` check would say "Value must be greater than 1" of a valid 1)."""
    from ntt_core.input_rules import check_count

    prop = inputs.int(name, label=label, **options)
    value = ctx.params.get(name)
    if value is not None:
        check(prop, lambda: check_count(value, name))
    return prop


def invalid(prop, message: str) -> None:
    prop.invalid = True
    prop.error_message = message


def choice(inputs, name: str, values: list[str], label: str, description: str, default=None, missing: str = ""):
    """A dropdown of ``values`` (default: the first); the error ``missing`` when there is none."""
    if not values:
        prop = inputs.str(name, label=label, description=description)
        invalid(prop, missing)
        return prop
    dropdown = types.Dropdown(label=label, description=description)
    for value in values:
        dropdown.add_choice(value, label=value)
    return inputs.enum(name, dropdown.values(), default=default or values[0], view=dropdown)


def field_choice(inputs, name: str, fields: list[str], label: str, description: str, default=None):
    """A dropdown of Detections fields."""
    return choice(inputs, name, fields, label, description, default, missing="the dataset has no Detections field")


def bank_choice(inputs, ctx, name: str = "bank_key", default: str | None = None):
    """A dropdown of the dataset's memory banks (default: ``default`` if given, else the first)."""
    from ntt_core.fiftyone.bank_runs import list_memory_banks

    banks = list_memory_banks(ctx.dataset)
    missing = "the dataset has no memory bank: run 'Build memory bank' first"
    description = "A memory bank stored on this dataset"
    return choice(inputs, name, banks, "Memory bank", description, default=default, missing=missing)


def model_inputs(inputs, segmenter: bool = True, encoder: bool = True) -> None:
    """SAM2 / DINOv2 sources, device and compute dtype (empty model = the paper's model).

    The model fields start as ``$NTT_SAM2`` / ``$NTT_DINOV2`` of the App server's environment
    when set (e.g. local folders on an offline server), else empty.
    """
    if segmenter:
        inputs.str(
            "sam2",
            label="SAM2 model",
            description="Hugging Face hub id, short name (e.g. sam2.1-large) or local folder; empty: the paper's SAM2 Hiera-L",
            default=os.environ.get("NTT_SAM2", ""),
            allow_empty=True,
        )
    if encoder:
        inputs.str(
            "dinov2",
            label="DINOv2 model",
            description="Hugging Face hub id, short name or local folder; empty: the paper's DINOv2 ViT-L/14",
            default=os.environ.get("NTT_DINOV2", ""),
            allow_empty=True,
        )
    inputs.enum("device", list(DEVICES), default="auto", label="Device", view=types.Dropdown(label="Device"))
    inputs.enum(
        "dtype",
        list(DTYPES),
        default="auto",
        label="Compute dtype",
        description=(
            "auto: float32 everywhere, as the authors ran; bfloat16 is faster on CPUs with AMX (1.6x per "
            "image measured on one) and expected to be on GPUs, its accuracy against the paper's unmeasured"
        ),
    )


def check_models(ctx, inputs) -> None:
    """Mark a model field that names a model no loader can load (the offline demo's stand-ins)."""
    from ntt_core.fiftyone.bank_runs import check_loadable_model

    for name, role in (("sam2", "SAM2"), ("dinov2", "DINOv2")):
        if name in inputs.properties:
            source = current(ctx, inputs, name)
            check(inputs.properties[name], lambda source=source, role=role: check_loadable_model(source, role))


def model_options(params: dict) -> dict:
    """Device and dtype keyword arguments of the model loaders (which read "auto" themselves)."""
    return {name: params[name] for name in ("device", "dtype")}


def timed_progress(progress, key: str):
    """``progress`` that also keeps the seconds per image (item) of this run (after its first image when
    no figure exists yet, and at its end): see ``ntt_core.fiftyone.timings.run_timer``."""
    from ntt_core.fiftyone.timings import run_timer

    timer = run_timer(key)

    def timed(done: int, total: int, detail: str = "") -> None:
        if not detail:
            timer(done, total)
        progress(done, total, detail)

    return timed


def result(operator, report: dict) -> dict:
    """The operator's result: its report (for scripts) and the report's summary (shown in the App,
    ``operator.summarize``, see :mod:`.reports`)."""
    return {"report": report, "summary": operator.summarize(report)}


def finish(operator, ctx, report: dict) -> dict:
    """Reload the App's dataset after an immediate run; return the :func:`result`."""
    if not ctx.delegated:
        ctx.trigger("reload_dataset")
    return result(operator, report)


def from_app(ctx) -> bool:
    """Whether this is an immediate run that the App requested (and so streams).

    The App posts every execution with the operator's URI in the request body, which becomes the
    request parameters (FiftyOne's server requires it there); ``execute_operator`` (Python callers,
    :func:`call`) takes the URI as an argument and leaves it out of them. Delegated runs say so.
    """
    return not ctx.delegated and "operator_uri" in ctx.request_params


def run_with_progress(operator, ctx, label: str, work: Callable[[Callable[..., None]], dict]):
    """Run ``work(progress)``, which returns the report and calls ``progress(done, total, detail="")``
    as it goes (``detail``: what is happening now, e.g. "image 3 of 40: prompts 256/1024").

    From Python and in delegated runs: returns its :func:`result` (progress goes to
    ``ctx.set_progress``, a stage's at most every ``PROGRESS_INTERVAL_S`` and each finished item; a delegated run asked to stop from the panel, see
    ``ntt_core.fiftyone.stops``, stops at its next progress without ``detail``, i.e. after the
    image it is on). From the App, which shows progress only from operators that run as
    generators (``execute_as_generator=True``): returns a generator of App messages instead (see
    :func:`_stream`); such an operator must run all of its work through this.
    """
    if from_app(ctx):
        return _stream(operator, ctx, label, work)
    stop_requested = _stop_check(ctx)
    shown_at = [float("-inf")]

    def progress(done: int, total: int, detail: str = "") -> None:
        # each one is a database write in a delegated run: a stage's at most every PROGRESS_INTERVAL_S
        if not detail or time.monotonic() - shown_at[0] >= PROGRESS_INTERVAL_S:
            ctx.set_progress(**_progress(label, done, total, detail))
            shown_at[0] = time.monotonic()
        if not detail and stop_requested():
            from ntt_core.errors import RunStopped

            raise RunStopped("stopped from the Memory banks panel")

    if ctx.delegated:  # the first heartbeat, before the models load (see ntt_core.shards)
        ctx.set_progress(progress=0.0, label=LOADING)
    report = work(progress)
    return finish(operator, ctx, report)


def _stop_check(ctx) -> Callable[[], bool]:
    """Whether this delegated run was asked to stop (read at most every ``STOP_POLL_S``); never for other runs."""
    operation_id = getattr(ctx, "_delegated_operation_id", None)  # set by FiftyOne's delegated service
    if not ctx.delegated or operation_id is None:
        return lambda: False
    from ntt_core.fiftyone.stops import stop_requested

    asked_at = [float("-inf")]

    def check() -> bool:
        if time.monotonic() - asked_at[0] < STOP_POLL_S:
            return False
        asked_at[0] = time.monotonic()
        return stop_requested(ctx.dataset, str(operation_id))

    return check


LOADING = "Loading the models"
PROGRESS_INTERVAL_S = 0.25  # at most 4 progress messages a second
KEEPALIVE_S = 1.0  # an App run sends its progress at least this often, so it sees when nobody reads it
GONE_AFTER_S = 10.0  # an App run whose messages nobody read for this long stops (page closed, server stopping)
STOP_POLL_S = 2.0
_END = object()


def _progress(label: str, done: int, total: int, detail: str = "") -> dict:
    return {"progress": done / max(total, 1), "label": detail or f"{label}: {done}/{total}"}


def _stream(operator, ctx, label: str, work):
    """Run ``work`` in a thread; yield the App a ``set_progress`` for its latest progress at most
    every ``PROGRESS_INTERVAL_S`` (and the last one again every ``KEEPALIVE_S``), then its report as
    the operator's output (or its error, which also goes to the server's log), then a dataset
    reload (finished samples are saved either way).

    A failure is shown rather than raised: an exception raised while FiftyOne streams the messages
    breaks the response, and the App then shows nothing. When the App's request goes away (the page
    is closed or reloaded, or the server is stopping: SIGTERM cancels the requests after a grace
    period), FiftyOne stops reading or closes this generator; the work's next progress (a prompt
    batch of a segmentation) then raises :class:`~ntt_core.errors.RunStopped`, so the run ends
    with what it has written, and no server thread waits on it.
    """
    from ntt_core.errors import RunStopped

    events: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict = {}
    read_at = [time.monotonic()]  # when FiftyOne last asked for a message
    gone = threading.Event()

    def progress(done: int, total: int, detail: str = "") -> None:
        if gone.is_set() or time.monotonic() - read_at[0] > GONE_AFTER_S:
            gone.set()
            raise RunStopped("the App's request went away (page closed or reloaded, or the server is stopping)")
        events.put((done, total, detail))

    def run() -> None:
        try:
            outcome["report"] = work(progress)
        except BaseException as error:  # shown in the App below
            outcome["error"] = error
        finally:
            events.put(_END)

    threading.Thread(target=run, name=f"{operator.config.name}-run", daemon=True).start()
    try:
        shown = {"label": LOADING}
        yield ctx.ops.set_progress(**shown)
        read_at[0] = time.monotonic()
        latest, shown_at = None, float("-inf")
        while True:
            due = shown_at + PROGRESS_INTERVAL_S
            wait = KEEPALIVE_S if latest is None else max(0.0, due - time.monotonic())
            try:
                event = events.get(timeout=wait)
            except queue.Empty:  # the pending progress is due, or it is time to say the run is alive
                event = None
            if event is _END:
                break
            latest = event or latest
            if latest is None:  # nothing new: the last progress again
                yield ctx.ops.set_progress(**shown)
                read_at[0] = time.monotonic()
            elif time.monotonic() >= due:
                shown = _progress(label, *latest)
                yield ctx.ops.set_progress(**shown)
                read_at[0] = time.monotonic()
                latest, shown_at = None, time.monotonic()
        if latest is not None:
            yield ctx.ops.set_progress(**_progress(label, *latest))
        if "error" in outcome:
            error = outcome["error"]
            logger.error("%s failed: %s", operator.uri, error, exc_info=error)
            outputs = types.Object()
            outputs.view(
                "error",
                types.Error(label=f"{operator.config.label.removeprefix(LABEL_PREFIX)} failed", description=str(error)),
            )
            yield ctx.ops.show_output(types.Property(outputs).to_json(), {})
        else:
            yield ctx.ops.show_output(operator.resolve_output(ctx).to_json(), result(operator, outcome["report"]))
        yield ctx.ops.reload_dataset()
    finally:  # closed before the end: nobody is reading any more
        gone.set()


def report_output(ctx, label: str):
    """The output the App shows: the result's Markdown summary (the report stays in the result)."""
    outputs = types.Object()
    outputs.str("summary", label=label, view=types.MarkdownView())
    return types.Property(outputs)


def call(operator, sample_collection, params: dict, delegate: bool = False):
    """Run ``operator`` from Python on ``sample_collection`` (immediately, or queued if ``delegate``);
    returns the operator's result (the queued operation's document when delegated).

    A failed run raises FiftyOne's ``ExecutionError`` with the error's one-line message, as the
    CLI and the App show it, instead of the traceback FiftyOne puts there (logged at debug level).
    """
    from fiftyone.operators.executor import ExecutionError

    try:
        result = foo.execute_operator(
            operator.uri, dict(view=sample_collection.view()), params=params, request_delegation=delegate
        )
    except ExecutionError as error:
        traceback_text = str(error)
        logger.debug("%s failed:\n%s", operator.uri, traceback_text)
        raise ExecutionError(one_line(traceback_text)) from None
    return result.result


def one_line(error_text: str) -> str:
    """The message of the exception at the end of a formatted traceback (``Type: message``), or the
    text itself when it is not a traceback (FiftyOne's validation errors are one line already)."""
    if not error_text.startswith("Traceback"):
        return error_text
    lines = error_text.rstrip().splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith("  File ")), default=0)
    exception = " ".join(line.strip() for line in lines[last_frame + 1 :] if not line.startswith("    "))
    kind, colon, message = exception.partition(": ")
    return message if colon and " " not in kind else exception
