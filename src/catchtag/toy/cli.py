"""`catchtag toy ...`: the construction of Theorem 7.1, training seeds, and the success-rate table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from catchtag.errors import CatchtagError
from catchtag.inputs import check_at_least, check_between, check_finite, check_folder_out, parse_numbers
from catchtag.published import TOY as TOY_PUBLISHED

toy_app = typer.Typer(
    help="The averaging task where catch, tag, release provably works (Theorem 7.1) and emerges by training.",
    no_args_is_help=True,
    add_completion=False,
)

RECIPE_HELP = ("paper (plain Adam), hidden-sep-zero-q (ours, single), hidden-sep-l1norm-zv-t20 (ours, two-sink), "
               "hidden-sep-l1norm-wd, hidden-sep-l1norm, hidden-sep or qk-norm; docs/toy.md.")


def _fail(msg: str, command: str) -> None:
    """One line on stderr (with the command's --help as the fix when the message names none), exit 2."""
    msg = " ".join(str(msg).split())
    if "Fix" not in msg:
        msg = f"{msg.rstrip('.')}. Fix: see `catchtag toy {command} --help`"
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _check_variant(variant: str, allowed: tuple[str, ...]) -> None:
    if variant not in allowed:
        raise CatchtagError(f"unknown variant {variant!r}. Fix: --variant {', '.join(allowed[:-1])} or {allowed[-1]}")


def _check_length(variants, length: int) -> None:
    from catchtag.toy.task import min_length

    for v in variants:
        if length < min_length(v):
            raise CatchtagError(f"--length {length} is too short for the {v} variant: it needs at least "
                                f"{min_length(v)} tokens. Fix: e.g. --length 16")


def _check_recipe(recipe: str) -> None:
    from catchtag.toy.train import RECIPES

    if recipe not in RECIPES:
        raise CatchtagError(f"unknown recipe {recipe!r}. Fix: --recipe one of {', '.join(RECIPES)}")


@toy_app.command()
def construct(
    tags: str = typer.Option("1,2,3,4,6,8,10,15,20", help="Tag values to evaluate (comma-separated)."),
    variant: str = typer.Option("both", help="single, two-sink or both."),
    length: int = typer.Option(16, help="Sequence length."),
    eval_size: int = typer.Option(4096, help="Held-out sequences."),
    show_tag: float = typer.Option(10.0, help="Tag value of the attention-map pictures."),
    out: Path = typer.Option(Path("runs/toy/construct"), help="Output folder."),
) -> None:
    """Explicit weights of Theorem 7.1: error vs tag value, and the two attention maps."""
    import torch

    from catchtag.runs import save_figure_file
    from catchtag.toy.figures import plot_attention, plot_construct_error
    from catchtag.toy.model import construct_model
    from catchtag.toy.task import check_task, make_batch
    from catchtag.toy.train import EVAL_SEED, mechanism_metrics, r2_score

    variants = ["single", "two-sink"] if variant == "both" else [variant]
    try:  # everything is checked before the output folder is made
        _check_variant(variant, ("single", "two-sink", "both"))
        _check_length(variants, length)
        check_at_least("--eval-size", eval_size, 1, 4096)
        check_finite("--show-tag", show_tag, 10)
        tag_values = parse_numbers("--tags", tags, "1,2,3,4,6,8,10,15,20", required=True)
        check_folder_out(out)
        for v in variants:
            check_task(v, length)
    except (CatchtagError, ValueError) as e:
        _fail(str(e), "construct")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in variants:
        batch = make_batch(eval_size, length, v, generator=torch.Generator().manual_seed(EVAL_SEED))
        for t in tag_values:
            m = construct_model(t, v)
            with torch.no_grad():
                y = m(batch.values, batch.types)
            mm = mechanism_metrics(m, batch)
            rows.append(
                {
                    "variant": v, "tag": t,
                    "rmse": float(((y - batch.target) ** 2).mean().sqrt()),
                    "max_abs_err": float((y - batch.target).abs().max()),
                    "r2": r2_score(y, batch.target),
                    "sink_mass": mm["sink_mass"], "release_mass": mm["release_mass"],
                    "release_entropy": mm["release_entropy"],
                }
            )
        ex = int((batch.types.shape[1] - batch.sep).argmax()) if v == "single" else 0
        save_figure_file(plot_attention(construct_model(show_tag, v), batch, index=ex,
                                        title=f"construction, {v}, tag={show_tag:g}"),
                         out / f"construct_attention_{v}.png")
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "construct.csv", index=False)
    save_figure_file(plot_construct_error(df), out / "construct_error.png")
    typer.echo(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    typer.echo(f"wrote {out}/construct.csv and PNGs")


def _print_rows(df) -> None:
    cols = [c for c in ["seed", "r2", "success", "sink_mass", "release_mass", "release_entropy", "sink2_mass",
                        "sink_between_mass", "between_mass", "between_entropy", "r2_tag_removed", "tag_share",
                        "r2_tag2_removed", "tag2_share", "mechanism", "tag_causal", "tag", "seconds"] if c in df]
    typer.echo(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))


@toy_app.command()
def train(
    variant: str = typer.Option("single", help="single or two-sink."),
    seeds: int = typer.Option(10, help="Number of seeds (0..N-1)."),
    init_tag: float = typer.Option(10.0, help="Initial value of the learnable [SEP] tag."),
    heads: int = typer.Option(0, help="Heads per layer (0: 1 for single, 2 for two-sink)."),
    recipe: str = typer.Option("paper", help=RECIPE_HELP),
    steps: int = typer.Option(0, help="Training steps (0: the recipe's)."),
    length: int = typer.Option(16, help="Sequence length."),
    threshold: float = typer.Option(0.99, help="Success: held-out R^2 >= threshold."),
    workers: int = typer.Option(0, help="Processes (0: all cores)."),
    figures: int = typer.Option(3, help="Attention pictures for at most this many successful seeds."),
    out: Path = typer.Option(Path("runs/toy/train"), help="Output folder (per-seed rows are appended, resumable)."),
) -> None:
    """Train N seeds, report held-out R^2, success rate and the mechanism per seed."""
    from catchtag.runs import save_figure_file
    from catchtag.toy.figures import plot_attention, plot_seeds
    from catchtag.toy.model import ToyConfig
    from catchtag.toy.train import eval_batch, load_trained, make_recipe, recipe_model_options, summarize, train_seeds
    from catchtag.toy.task import TaskConfig

    try:  # everything is checked before the output folder is made
        _check_variant(variant, ("single", "two-sink"))
        _check_recipe(recipe)
        check_at_least("--seeds", seeds, 1, 10)
        check_finite("--init-tag", init_tag, 10)
        check_at_least("--heads", heads, 0, 2, " (0: 1 for single, 2 for two-sink)")
        check_at_least("--steps", steps, 0, 2000, " (0: the recipe's)")
        _check_length([variant], length)
        check_between("--threshold", threshold, 0, 1, 0.99, high_in=True)
        check_at_least("--workers", workers, 0, 0, " (0: all cores)")
        check_at_least("--figures", figures, 0, 3)
        check_folder_out(out)
        task = TaskConfig(variant, length)
        tc = make_recipe(recipe, steps=steps or None, threshold=threshold)
        mc = ToyConfig(variant, n_heads=heads or None, init_tag=init_tag, **recipe_model_options(recipe))
    except (CatchtagError, ValueError) as e:
        _fail(str(e), "train")
    t0 = time.time()
    label = f"{variant} heads={mc.n_heads} tag={init_tag:g} {recipe}"
    res = train_seeds(mc, tc, task, seeds, out, workers or None, label=label)
    df = res.rows
    tagname = f"{variant}_h{mc.n_heads}_tag{init_tag:g}_{recipe}"
    df.to_csv(out / f"seeds_{tagname}.csv", index=False)
    summ = summarize(res, variant=variant, heads=mc.n_heads, init_tag=init_tag, recipe=recipe,
                     wall_seconds=round(time.time() - t0, 1))
    (out / f"summary_{tagname}.json").write_text(json.dumps(summ, indent=1))
    save_figure_file(plot_seeds(df, title=label), out / f"seeds_{tagname}.png")
    ev = eval_batch(task, 64)
    for s in df.loc[df.success, "seed"].tolist()[:figures]:
        save_figure_file(plot_attention(load_trained(out, res, int(s)), ev, title=f"trained seed {s}"),
                         out / f"attention_{tagname}_seed{s}.png")
    _print_rows(df)
    typer.echo(f"success {res.successes}/{res.n} (R^2 >= {threshold}); in the successes: attention check "
               f"(sinks >= {tc.sink_threshold}, release >= {tc.release_threshold}) {res.verified}/{res.successes}, "
               f"tag causally used {res.tag_verified}/{res.successes}; wall {time.time() - t0:.0f}s; out {out}")


@toy_app.command()
def table(
    seeds: int = typer.Option(10, help="Seeds per cell."),
    init_tags: str = typer.Option("1,6,10", help="Initial tag values of the single variant."),
    recipe: str = typer.Option("paper", help=RECIPE_HELP),
    steps: int = typer.Option(0, help="Training steps (0: the recipe's)."),
    length: int = typer.Option(16, help="Sequence length."),
    two_sink: bool = typer.Option(True, help="Also the two-sink variant with 2 vs 1 heads per layer."),
    workers: int = typer.Option(0, help="Processes (0: all cores)."),
    out: Path = typer.Option(Path("runs/toy/table"), help="Output folder (resumable)."),
) -> None:
    """Success rates over initial tag values, and the two-sink variant with two heads vs one."""
    from catchtag.toy.task import check_task
    from catchtag.toy.train import make_recipe, success_table

    try:  # everything is checked before the output folder is made
        _check_recipe(recipe)
        check_at_least("--seeds", seeds, 1, 10)
        tags = parse_numbers("--init-tags", init_tags, "1,6,10", required=True)
        check_at_least("--steps", steps, 0, 2000, " (0: the recipe's)")
        _check_length(["single", "two-sink"] if two_sink else ["single"], length)
        check_at_least("--workers", workers, 0, 0, " (0: all cores)")
        check_folder_out(out)
        make_recipe(recipe)
        check_task("single", length)
        if two_sink:
            check_task("two-sink", length)
    except (CatchtagError, ValueError) as e:
        _fail(str(e), "table")
    t0 = time.time()
    df = success_table(list(tags), seeds, recipe, length, (2, 1) if two_sink else (), out, workers or None,
                       steps or None)
    df["published"] = [TOY_PUBLISHED.get((r.variant, r.heads, float(r.init_tag)), "") for r in df.itertuples()]
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"table_{recipe}.csv", index=False)
    cols = ["variant", "heads", "init_tag", "recipe", "rate", "verified", "tag_verified", "published", "median_r2",
            "mean_sink_mass_success", "sec_per_seed"]
    typer.echo(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    typer.echo(f"wall {time.time() - t0:.0f}s; wrote {out}/table_{recipe}.csv")
