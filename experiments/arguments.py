"""Prints the reference table of every argument and its valid values, as Markdown.

    python -m experiments.arguments > docs/arguments.md

The programs' flags come from their tables (`experiments.flags.Flag`, from which
their parsers, validation and `--help` are built too), the library's from
`elastic_jax.validation.FACTORY_ARGUMENTS` with each default read from the
factory's signature. `tests/test_reliability.py` checks that the committed file is
this output and that the library's ranges are the ones its factories enforce.
"""

from __future__ import annotations

import inspect
import sys

import elastic_jax as ej
from experiments import config as config_lib
from experiments import (
    consistency_table,
    convex_rates,
    diloco,
    error_feedback_study,
    flags,
    hypergradients,
    record_async,
    time_to_accuracy,
    topologies,
)

HEADER = """\
# Arguments and their valid values

Generated from the code by `python -m experiments.arguments > docs/arguments.md`; do
not edit by hand (`tests/test_reliability.py` checks that this file is current). A
value outside its range is refused before anything compiles, with one line of the
form `<argument>: got <value>; expected <valid values>`: a `ValueError` from the
library, and from the programs the same line with the flag's name (`--<flag>: ...`)
on stderr and exit status 2. A flag given on the command line that does not apply
(see `applies with`) is refused the same way; one not given takes no part in the run.
"""
PROGRAMS = (  # (module, flags) of every program below the launcher
    ("experiments.error_feedback_study", error_feedback_study.FLAGS),
    ("experiments.consistency_table", consistency_table.FLAGS),
    ("experiments.convex_rates", convex_rates.FLAGS),
    ("experiments.hypergradients", hypergradients.FLAGS),
    ("experiments.topologies", topologies.FLAGS),
    ("experiments.record_async", record_async.FLAGS),
    ("experiments.time_to_accuracy", time_to_accuracy.FLAGS),
    ("experiments.diloco", diloco.FLAGS),
)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _flag_default(spec: flags.Flag) -> str:
    if spec.kind == "bool":
        return f"`--{spec.name}`" if spec.default else f"`--no{spec.name}`"
    return f"`{spec.text(spec.default)}`" if spec.default != "" else "(empty)"


def flag_lines(module: str, table, resume: bool = False) -> list[str]:
    """The flags of `python -m <module>`."""
    named = flags.by_name(table)
    rows = [(f"`--{s.name}`", _flag_default(s), s.expected, flags.condition(named, s.name)
             or "always", *(("yes" if s.semantic else "no",) if resume else ()), s.help)
            for s in table]
    header = ("flag", "default", "valid values", "applies with",
              *(("resume must keep",) if resume else ()), "meaning")
    return [f"## Flags of `python -m {module}`", "", *_table(header, rows)]


def launcher_lines() -> list[str]:
    """The flags of `python -m experiments.train` and its exit status."""
    lines = flag_lines("experiments.train", config_lib.FLAGS, resume=True)
    lines[1:1] = ["", "`resume must keep`: whether `--resume` refuses a value that differs "
                  "from the saved `config.json` (`--rounds` too when a decaying schedule spans "
                  "it, `--schedule_rounds=0`)."]
    lines += ["", "### Exit status", ""]
    lines += _table(("status", "meaning"), list(config_lib.EXIT_STATUS))
    for module, table in PROGRAMS:
        lines += ["", *flag_lines(module, table)]
    lines += ["", "The studies and `experiments.hypergradients` exit with 0, 2 (a bad flag or "
              "workdir, one line, nothing compiled) or 4 (a write into the workdir failed)."]
    return lines


def _factory(name: str):
    target = ej
    for part in name.split("."):
        target = getattr(target, part)
    return target


def _plain(signature: inspect.Signature) -> inspect.Signature:
    """The signature without annotations: `(learning_rate, num_workers, *, ...)`."""
    empty = inspect.Parameter.empty
    return signature.replace(
        parameters=[p.replace(annotation=empty) for p in signature.parameters.values()],
        return_annotation=empty)


def _default(parameter: inspect.Parameter) -> str:
    if parameter.default is inspect.Parameter.empty:
        return "required"
    return f"`{parameter.default!r}`"


def library_lines() -> list[str]:
    """Every argument of every public factory (`elastic_jax.validation.FACTORY_ARGUMENTS`)."""
    lines = ["## Library factories: `import elastic_jax as ej`", "",
             "Concrete values are checked when the factory is called (sizes that depend on "
             "the parameters, such as `k <= d`, when the algorithm's `init` or the "
             "compressor first sees them); a JAX tracer passes unchecked, so a factory can "
             "be built inside a differentiated function."]
    for name, arguments in ej.validation.FACTORY_ARGUMENTS.items():
        signature = inspect.signature(_factory(name))
        lines += ["", f"### `ej.{name}{_plain(signature)}`", ""]
        if not arguments:
            lines.append("No arguments.")
            continue
        rows = [(f"`{a.name}`", _default(signature.parameters[a.name]), a.expected)
                for a in arguments]
        lines += _table(("argument", "default", "valid values"), rows)
    return lines


def markdown() -> str:
    """The whole reference, as committed in `docs/arguments.md`."""
    return "\n".join([HEADER, *launcher_lines(), "", *library_lines()]) + "\n"


def main() -> None:
    sys.stdout.write(markdown())


if __name__ == "__main__":
    main()
