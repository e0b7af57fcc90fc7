"""The hstu-opt command line: parse arguments -> call the library -> render with rich.

The only place that turns an HstuOptError into a one-line message and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hstu_opt.errors import HstuOptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn an HSTU checkpoint into a versioned engine bundle.")
console = Console(stderr=False, soft_wrap=True)  # status lines stay whole in CI logs (no hard wrap at 80)
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _state["debug"] = debug


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except HstuOptError as exc:
        if _state["debug"]:
            traceback.print_exc()
        # escape: messages such as "pip install 'hstu-opt[serve]'" hold brackets rich would take for markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


class RichReporter:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def stage_started(self, name: str) -> None:
        pass

    def stage_finished(self, name: str, record: dict, cached: bool, seconds: float) -> None:
        status = "[dim]cached[/]" if cached else f"[green]ran[/] in {seconds:.1f}s"
        console.print(f"  [bold]{name:<15}[/] {status}  {record.get('headline', '')}", highlight=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None):
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            tid = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(tid, n)

    def log(self, message: str) -> None:
        console.print(f"  [yellow]{message}[/]", highlight=False)


def _metrics_table(record: dict) -> Table:
    m = record["metrics"]
    table = Table(title="held-out (leave-one-out) test metrics")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("popularity", justify="right")
    for key in m["test"]:
        table.add_row(key, f"{m['test'][key]:.4f}", f"{m['popularity_test'][key]:.4f}")
    return table


def _load(recipe_path: Path, target: Optional[str] = None, precision: Optional[str] = None):
    from hstu_opt.recipe import load_recipe
    from hstu_opt.targets import for_target

    return for_target(load_recipe(recipe_path), target, precision)


_TARGET_HELP = "Build for this target: cpu (onnxruntime), sm89 (TensorRT-RTX plans), sm90 (compiled, on that GPU)."
_PRECISION_HELP = "float (the recipe's dtype only) or int8 (also the INT8 Q/DQ engines)."


def _build(recipe_path: Path, out: Path, until: Optional[str], force: list[str], target: Optional[str] = None,
           precision: Optional[str] = None) -> None:
    from hstu_opt import pipeline

    with _errors():
        recipe = _load(recipe_path, target, precision)
        console.print(f"[bold]hstu-opt build[/] {recipe_path} -> {out}/{recipe.name}/{recipe.version}")
        reporter = RichReporter()
        bundle, results = pipeline.build(recipe, out, reporter, until=until, force=tuple(force))
        cached = sum(r.cached for r in results)
        console.print(f"bundle: [bold]{bundle}[/] ({cached}/{len(results)} stages cached, "
                      f"{time.perf_counter() - reporter.t0:.1f}s)")
        train = next((r for r in results if r.stage.name == "train-stub"), None)
        if train is not None:
            console.print(_metrics_table(train.record))
        for r in results:  # the tables of stages that ran now (INT8 accuracy, benchmarks); inspect shows all
            if not r.cached:
                for table in r.record.get("tables", []):
                    console.print(_record_table(table))


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    out: Path = typer.Option(Path("artifacts"), "--out", help="Output root."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage."),
    force: list[str] = typer.Option([], "--force", help="Rerun this stage even if cached (repeatable)."),
    target: Optional[str] = typer.Option(None, "--target", help=_TARGET_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=_PRECISION_HELP),
) -> None:
    """Run every stage of RECIPE (reusing cached ones) and write the bundle."""
    _build(recipe, out, until, force, target, precision)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    out: Path = typer.Option(Path("artifacts"), "--out", help="Output root whose cache is looked at."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    target: Optional[str] = typer.Option(None, "--target", help=_TARGET_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=_PRECISION_HELP),
    env_file: Optional[Path] = typer.Option(
        None, "--env-file", help="Also append name=value lines (bundle, artifact, cache_key, cache_prefix) to this "
        "file: the format of $GITHUB_OUTPUT and of GitLab dotenv files."),
) -> None:
    """What `build` would do, without doing it: stages in order, cached or not, keys, CI cache key."""
    from hstu_opt import bundle as bundle_mod
    from hstu_opt import pipeline, toolchain

    with _errors():
        r = _load(recipe, target, precision)
        stages = pipeline.plan(r, out)
    report = {
        "recipe": str(recipe), "name": r.name, "version": r.version, "recipe_sha256": r.digest(),
        "target": target, "precision": precision, "out": str(out), "bundle": str(bundle_mod.bundle_dir(out, r)),
        "toolchain_fingerprint": toolchain.fingerprint(), "toolchain": toolchain.toolchain(),
        "ci_cache": {"path": str(out / ".cache"), "key": pipeline.ci_cache_key(r),
                     "restore_prefix": pipeline.ci_cache_prefix(r)},
        "stages": [{"stage": f.stage.name, "version": f.stage.version, "cached": f.saved is not None, "key": f.key,
                    "note": f"unknown until {f.waits_for} runs" if f.key is None else None,
                    "sections": list(f.stage.key_sections(r)), "inputs": list(f.stage.input_stages(r))}
                   for f in stages],
    }
    if env_file is not None:
        _append_env(env_file, report)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_plan(report)


def _append_env(path: Path, report: dict) -> None:
    """What a pipeline reads from a plan: the bundle's path, an artifact name, the CI cache key and prefix."""
    artifact = "-".join(v for v in (report["name"], report["version"], report["target"], report["precision"]) if v)
    lines = {"bundle": report["bundle"], "artifact": artifact, "cache_key": report["ci_cache"]["key"],
             "cache_prefix": report["ci_cache"]["restore_prefix"]}
    with path.open("a") as f:
        f.writelines(f"{k}={v}\n" for k, v in lines.items())


def _print_plan(report: dict) -> None:
    console.print(f"[bold]hstu-opt plan[/] {report['recipe']} -> {report['bundle']}", highlight=False)
    for label, value in (("recipe sha256", report["recipe_sha256"]),
                         ("toolchain fingerprint", report["toolchain_fingerprint"]),
                         ("CI cache key", f"{report['ci_cache']['key']} (path {report['ci_cache']['path']})")):
        console.print(f"  {label:<22} {value}", highlight=False)
    table = Table(title="stages, in order")
    for col in ("#", "stage", "cached", "key", "keyed on"):
        table.add_column(col)
    for i, s in enumerate(report["stages"], 1):
        cached = "[green]cached[/]" if s["cached"] else "[yellow]will run[/]"
        table.add_row(str(i), s["stage"], cached, s["key"][:16] if s["key"] else f"[dim]{s['note']}[/]",
                      ", ".join(s["sections"] + s["inputs"]))
    console.print(table)
    n = sum(s["cached"] for s in report["stages"])
    console.print(f"{n}/{len(report['stages'])} stages cached")


@app.command("recipe-schema")
def recipe_schema(path: Optional[Path] = typer.Argument(None, help="Write here (default: stdout).")) -> None:
    """The recipe's JSON Schema, for editors (e.g. `# yaml-language-server: $schema=recipe.schema.json`)."""
    from hstu_opt.recipe_doc import recipe_schema as schema

    text = json.dumps(schema(), indent=2) + "\n"
    if path is None:
        typer.echo(text, nl=False)
        return
    path.write_text(text)
    console.print(f"wrote {path}", highlight=False)


def _stage_command(stage_name: str):
    def command(
        recipe: Path = typer.Argument(..., help="Recipe YAML."),
        out: Path = typer.Option(Path("artifacts"), "--out", help="Output root."),
        force: bool = typer.Option(False, "--force", help="Rerun this stage even if cached."),
    ) -> None:
        _build(recipe, out, stage_name, [stage_name] if force else [])

    command.__doc__ = f"Run the pipeline up to '{stage_name}' (earlier stages come from the cache when unchanged)."
    return command


def _register_stage_commands() -> None:
    from hstu_opt.stages import STAGES

    for stage in STAGES:
        app.command(stage.name)(_stage_command(stage.name))


@app.command()
def verify(bundle: Path = typer.Argument(..., help="Bundle directory.")) -> None:
    """Recompute every checksum in the bundle's manifest; exit 1 on any problem."""
    from hstu_opt import bundle as bundle_mod

    with _errors():
        problems = bundle_mod.verify(bundle)
    for p in problems:
        err_console.print(f"[red]{p}[/]", highlight=False)
    if problems:
        err_console.print(f"[bold red]verify failed:[/] {len(problems)} problem(s) in {bundle}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {bundle}: every file matches its manifest checksum")


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="Bundle directory.")) -> None:
    """A readable summary of a bundle: recipe, toolchain, stages, metrics."""
    from hstu_opt import bundle as bundle_mod

    with _errors():
        m = bundle_mod.load_manifest(bundle)
    console.print(f"[bold]{m['name']} {m['version']}[/]  created {m['created_utc']}  recipe sha256 {m['recipe_sha256'][:12]}")
    tc = Table(title="toolchain")
    tc.add_column("tool")
    tc.add_column("version")
    for k, v in m["toolchain"].items():
        tc.add_row(k, str(v))
    console.print(tc)
    st = Table(title="stages")
    for col in ("stage", "key", "files", "bytes", "summary"):
        st.add_column(col)
    for name, s in m["stages"].items():
        size = sum(o["size"] for o in s["outputs"].values())
        st.add_row(name, s["key"][:12], str(len(s["outputs"])), f"{size:,}", s["record"].get("headline", ""))
    console.print(st)
    if "train-stub" in m["stages"]:
        console.print(_metrics_table(m["stages"]["train-stub"]["record"]))
    for name, s in m["stages"].items():
        for table in s["record"].get("tables", []):
            console.print(_record_table(table))


def _record_table(spec: dict) -> Table:
    table = Table(title=spec["title"])
    for col in spec["columns"]:
        table.add_column(col)
    for row in spec["rows"]:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    table.columns[0].no_wrap = True
    return table


@app.command("import-stu")
def import_stu_cmd(
    state_dict: Path = typer.Argument(..., help="generative-recommenders state_dict (.pt or .safetensors)."),
    recipe: Path = typer.Option(..., "--recipe", help="Recipe whose model section describes the STU stack."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    base: Optional[Path] = typer.Option(None, "--base", help="Checkpoint providing embeddings and heads."),
) -> None:
    """Load Meta generative-recommenders STU layers into an hstu-opt checkpoint."""
    from hstu_opt.model.checkpoint import import_stu_checkpoint
    from hstu_opt.recipe import load_recipe

    with _errors():
        layers = import_stu_checkpoint(state_dict, load_recipe(recipe), out, base)
    console.print(f"[green]imported[/] {layers} STU layers from {state_dict} -> {out}")


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory (artifacts/<name>/<version>)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port; the URL is printed)."),
    engine: str = typer.Option("auto", "--engine", help="auto, compiled, onnxruntime or eager (auto says why)."),
    runner: str = typer.Option("native", "--runner", help="native or vllm."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most requests per engine batch."),
    max_wait_ms: float = typer.Option(0.0, "--max-wait-ms", help="Longest a lone request is held for company when "
                                      "the engine is idle (0: run at once; requests arriving meanwhile form the next batch)."),
    cache_gb: float = typer.Option(1.0, "--cache-gb", help="User K/V cache: its page pool in GB, on the GPU when "
                                   "there is one, else in host memory (0: off)."),
    cache_policy: str = typer.Option("predictive", "--cache-policy", help="Cache eviction: predictive (a per-user "
                                     "survival estimate of the next request, the default) or lru; docs/serving.md."),
    host_cache_gb: Optional[float] = typer.Option(None, "--host-cache-gb", help="The cache's host tier in GB (pinned "
                                                  "memory; entries evicted from the pool move there). Default: as "
                                                  "--cache-gb; 0: none."),
    cache_page_rows: Optional[int] = typer.Option(None, "--cache-page-rows", help="Rows per cache page (default "
                                                  "128; a multiple of 64 keeps the Triton kernel; docs/serving.md)."),
    cache_prefetch_s: float = typer.Option(0.0, "--cache-prefetch-s", help="Between batches, move host-tier entries "
                                           "whose users are more likely than not to return within this many seconds "
                                           "into free pool pages (predictive policy; 0: off; docs/serving.md)."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Queued requests beyond this get 503 + Retry-After."),
    max_body_mb: float = typer.Option(1.0, "--max-body-mb", help="Larger request bodies get 413."),
    torch_threads: int = typer.Option(0, "--torch-threads", help="PyTorch intra-op threads (0: its default)."),
    loop: str = typer.Option("auto", "--loop", help="Event loop: auto (uvloop when installed), asyncio or uvloop."),
    http: str = typer.Option("auto", "--http", help="HTTP/1.1 parser: auto (httptools when installed), h11 or "
                             "httptools."),
    inline_lone: Optional[bool] = typer.Option(None, "--inline-lone/--no-inline-lone", show_default="auto: graph "
                                               "replays only", help="Native runner: run a request that is alone in "
                                               "the server on the event loop's thread when the engine is idle (skips "
                                               "two thread hand-offs; only with --max-wait-ms 0). Auto: only when its "
                                               "engine call replays a captured CUDA graph (docs/serving.md)."),
) -> None:
    """Serve BUNDLE over HTTP (POST /v1/rank, /v1/retrieve; docs at /docs) until SIGINT/SIGTERM. Needs the serve extra."""
    with _errors():
        from hstu_opt.serve.settings import ServeSettings

        settings = ServeSettings(bundle, host, port, engine, runner, max_batch, max_wait_ms, max_queue, cache_gb,
                                 max_body_mb, torch_threads, cache_policy, host_cache_gb,
                                 **({"cache_page_rows": cache_page_rows} if cache_page_rows else {}), loop=loop,
                                 http=http, inline_lone=inline_lone, cache_prefetch_s=cache_prefetch_s)
        from hstu_opt.serve import server  # fastapi and uvicorn: only here (BackendUnavailable names the extra)

        server.serve(settings, _announce)


def _announce(line: str) -> None:
    console.print(line, markup=False, highlight=False)
    sys.stdout.flush()  # (a pipe reading the startup lines, e.g. a supervisor, sees them at once)


def main() -> None:
    _register_stage_commands()
    app()


if __name__ == "__main__":
    sys.exit(main())
