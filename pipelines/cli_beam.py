"""Beam pipeline options on the command line: the flags a Beam job's command passes
through (unrecognised --flags and --beam-options-file), checked as Beam parses them."""
from __future__ import annotations

import argparse

from mimdex.infra.errors import UsageError


def add_beam_flags(p) -> None:
    """Beam pipeline options: unrecognised --flags, and/or a file of them (one per line)."""
    p.add_argument("--beam-options-file", help="file (any URI) of Beam pipeline options, one per line, '#' "
                                               "comments; e.g. infra/beam/flink.options. Options given on the "
                                               "command line come after, so they win")
    p.set_defaults(passes_through=True)


def unknown_beam_flags(flags: list[str]) -> list[str]:
    """The flags that no Beam pipeline option accepts, parsed as Beam parses its options
    (every registered PipelineOptions class, no abbreviations)."""
    if not flags:
        return []
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    from mimdex.pipelines.beam_runner import register_runner_options

    register_runner_options(flags)  # a runner Beam does not import itself (Dask): its options

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # as PipelineOptions.get_all_options builds its parser
    _, unknown = parser.parse_known_args(flags)
    return unknown


def check_beam_flags(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> list[str]:
    """Flags mimdex did not take: Beam options (given anywhere, or after ``--``), or exit 2."""
    flags = [a for a in extra if a != "--"]
    try:
        unknown = unknown_beam_flags(flags)
    except UsageError as exc:  # a runner's extra is missing: one line, exit 2
        parser.error(f"{command}: {exc}")
    if unknown:
        parser.error(f"{command}: unrecognized arguments: {' '.join(unknown)} (neither a mimdex flag nor a Beam "
                     f"pipeline option; see `mimdex {command} --help`)")
    return flags


def beam_args(args: argparse.Namespace) -> list[str]:
    from mimdex.infra import storage

    lines = []
    if getattr(args, "beam_options_file", None):
        uri = args.beam_options_file
        try:
            text = storage.read_bytes(uri).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"--beam-options-file {uri}: not UTF-8 text: {exc}") from exc
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        unknown = unknown_beam_flags(lines)
        if unknown:
            raise UsageError(f"--beam-options-file {uri}: not Beam pipeline options: {' '.join(unknown)}")
    from mimdex.pipelines.beam_runner import resolve

    return resolve(lines + list(args.extra))  # a runner's missing flag fails here, before any work
