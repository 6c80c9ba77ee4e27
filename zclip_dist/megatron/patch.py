"""The source patch for teams that keep their own Megatron-LM fork, made from one description.

    python -m zclip_dist.megatron.patch /path/to/Megatron-LM > zclip.patch
    git -C /path/to/Megatron-LM apply --check zclip.patch && git -C /path/to/Megatron-LM apply zclip.patch

It adds natively what ``python -m zclip_dist.megatron.launch`` adds at run time: the ``--zclip*`` /
``--adagc*`` flags (validated first in ``validate_args``), the optimizer wrap in
``setup_model_and_optimizer`` and the metrics in ``training_log``. Each insertion is placed by an anchor
line inside a named function, the same in Megatron-LM core_v0.16.1 to core_v0.19.0; a checkout where an
anchor is missing or not unique is refused, naming the file, the function and the line looked for.
``patches/`` holds the output for the tags the tests run on.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PatchError", "make_patch", "main"]

_ON = "if getattr(args, 'zclip', False) or getattr(args, 'adagc', False):"


class PatchError(ValueError):
    """The checkout does not have an anchor line the patch is placed by."""


@dataclass(frozen=True)
class _Insertion:
    path: str  # file in the checkout
    scope: str  # the top-level ``def`` the anchor must be inside (its first line starts with this)
    anchor: str  # the anchor line, stripped (a prefix of it when ``prefix``)
    after: bool  # insert after the anchor, else before it
    lines: tuple[str, ...]  # inserted lines, relative to the indentation
    indent: str | None = None  # the indentation; None: the anchor's (or the ``indent_of`` line's)
    indent_of: str | None = None  # take it from the closest line above the anchor with this stripped text
    prefix: bool = False


_ARGUMENTS, _TRAINING = "megatron/training/arguments.py", "megatron/training/training.py"
_INSERTIONS = (
    _Insertion(_ARGUMENTS, "def add_megatron_arguments(", "return parser", after=False,
               lines=("parser = _add_zclip_args(parser)", "")),
    _Insertion(_ARGUMENTS, "def add_megatron_arguments(", "return parser", after=True, indent="", lines=(
        "", "",
        "def _add_zclip_args(parser):",
        '    """--zclip/--zclip-<setting> (ZClip) and --adagc/--adagc-<setting> (AdaGC): adaptive clipping '
        '(zclip_dist)."""',
        "    try:",
        "        from zclip_dist.megatron import add_arguments",
        "    except ImportError:",
        "        return parser  # zclip_dist not installed: no --zclip/--adagc flags",
        "    return add_arguments(parser)",
    )),
    _Insertion(_ARGUMENTS, "def validate_args(", "def validate_args(", after=True, indent="    ", prefix=True, lines=(
        "",
        _ON,
        "    # Fail before anything is built, naming the flag (e.g. --adagc-beta; --zclip with --adagc).",
        "    from zclip_dist.megatron import clipping_config",
        "    clipping_config(args)",
    )),
    _Insertion(_TRAINING, "def setup_model_and_optimizer(",
               "opt_param_scheduler = get_optimizer_param_scheduler(optimizer)", after=False, lines=(
        _ON,
        "    # ZClip / AdaGC replace the fixed --clip-grad clipping; --clip-grad stays ZClip's cap,",
        "    # AdaGC's lambda_abs. AdaGC keys its per-tensor state by the model's parameter names.",
        "    from zclip_dist.megatron import clipping_config, wrap_optimizer",
        "    optimizer = wrap_optimizer(optimizer, clipping_config(args), model=model)",
    )),
    _Insertion(_TRAINING, "def training_log(", "wandb_writer.log({'grad-norm': grad_norm}, iteration)", after=True,
               indent_of="if grad_norm is not None:", lines=(
        _ON,
        "    from zclip_dist.megatron import attached_optimizer, log_metrics",
        "    log_metrics(attached_optimizer(), iteration, writer, wandb_writer)",
    )),
)


def _scope(lines: list[str], ins: _Insertion) -> range:
    starts = [i for i, line in enumerate(lines) if line.startswith(ins.scope)]
    if len(starts) != 1:
        raise PatchError(f"{ins.path}: expected one '{ins.scope}...' at the top level, found {len(starts)}")
    end = next((i for i in range(starts[0] + 1, len(lines))
                if lines[i].startswith(("def ", "class ", "@")) and not lines[i].startswith(ins.scope)), len(lines))
    return range(starts[0], end)


def _place(lines: list[str], ins: _Insertion) -> tuple[int, list[str]]:
    """Where the insertion goes (an index into ``lines``) and its lines with their indentation."""
    scope = _scope(lines, ins)
    hits = [i for i in scope
            if (lines[i].strip().startswith(ins.anchor) if ins.prefix else lines[i].strip() == ins.anchor)]
    if len(hits) != 1:
        raise PatchError(f"{ins.path}: expected one line '{ins.anchor}' in {ins.scope.split('(')[0][4:]}(), "
                         f"found {len(hits)}; this Megatron-LM is not one the patch is made for "
                         "(core_v0.16.1 to core_v0.19.0)")
    at = hits[0]
    indent = ins.indent
    if indent is None:
        source = lines[at]
        if ins.indent_of is not None:
            source = next((lines[i] for i in range(at, scope.start, -1) if lines[i].strip() == ins.indent_of), None)
            if source is None:
                raise PatchError(f"{ins.path}: no '{ins.indent_of}' above '{ins.anchor}'")
        indent = source[:len(source) - len(source.lstrip())]
    block = [(indent + text if text else "") + "\n" for text in ins.lines]
    return (at + 1 if ins.after else at), block


def _patched(text: str, insertions: list[_Insertion]) -> str:
    lines = text.splitlines(keepends=True)
    places = [_place(lines, ins) for ins in insertions]  # all against the original lines
    for index, block in sorted(places, key=lambda p: p[0], reverse=True):
        lines[index:index] = block
    return "".join(lines)


def make_patch(checkout: str | Path) -> str:
    """The patch for the Megatron-LM checkout at ``checkout``, as ``git apply`` takes it."""
    checkout = Path(checkout)
    out = []
    for path in dict.fromkeys(ins.path for ins in _INSERTIONS):
        file = checkout / path
        if not file.is_file():
            raise PatchError(f"{file} not found: point at a Megatron-LM checkout (its root, with megatron/training)")
        old = file.read_text()
        new = _patched(old, [ins for ins in _INSERTIONS if ins.path == path])
        diff = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                    fromfile=f"a/{path}", tofile=f"b/{path}")
        out.append(f"diff --git a/{path} b/{path}\n" + "".join(diff))
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zclip_dist.megatron.patch",
                                     description="Write the zclip_dist source patch for a Megatron-LM checkout.")
    parser.add_argument("checkout", help="the Megatron-LM checkout (core_v0.16.1 to core_v0.19.0, or a fork of one)")
    parser.add_argument("-o", "--output", help="write the patch here (default: standard output)")
    args = parser.parse_args(argv)
    try:
        patch = make_patch(args.checkout)
    except PatchError as err:
        print(f"zclip_dist.megatron.patch: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.output:
        Path(args.output).write_text(patch)
    else:
        sys.stdout.write(patch)


if __name__ == "__main__":
    main()
