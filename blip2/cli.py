"""``blip2``: ask a BLIP-2 endpoint about images from a shell.

    blip2 ask IMAGE [IMAGE...] -q QUESTION [-q QUESTION...] [--raw-prompt] [--json]
    blip2 caption IMAGE [IMAGE...] [--json]
    blip2 chat IMAGE                 questions from stdin, one per line; /quit or EOF ends,
                                     /reset forgets the earlier turns

IMAGE is a local file (sent as base64) or an http(s) URL (fetched by the service). Every
subcommand takes --url (default $BLIP2_ENDPOINT_URL or http://127.0.0.1:5001/score),
--key / --token / --deployment (default $BLIP2_ENDPOINT_KEY, $BLIP2_ENDPOINT_TOKEN,
$BLIP2_ENDPOINT_DEPLOYMENT), --timeout and the generation settings (--max-new-tokens ...).

Answers go to stdout; a failure is one line on stderr ("blip2: error: ...") and exit
status 1 (2 for bad command-line usage). Imports neither torch nor transformers.

Subcommands live in ``COMMANDS`` (name -> ``Command``); another module adds one with
``register_command`` before ``main`` builds the parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import batch_cli
from .client import Blip2Client, Conversation, EndpointError, encode_image, is_url


@dataclass(frozen=True)
class Command:
    """A subcommand: ``configure`` adds its arguments, ``run`` does the work and returns the exit status."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    uses_endpoint: bool = True  # adds --url/--key/... and the generation settings


COMMANDS: dict[str, Command] = {}


def register_command(name: str, command: Command) -> None:
    """Add (or replace) subcommand ``name``."""
    COMMANDS[name] = command


# (flag, type, help); the dest is the endpoint's parameter name.
_GENERATION_FLAGS = (
    ("--max-new-tokens", int, "most tokens to generate (server default 30)"),
    ("--min-new-tokens", int, "fewest tokens to generate"),
    ("--num-beams", int, "beam search width"),
    ("--temperature", float, "sampling temperature (with --do-sample)"),
    ("--top-p", float, "nucleus sampling mass (with --do-sample)"),
    ("--top-k", int, "sample from the k likeliest tokens (with --do-sample)"),
    ("--repetition-penalty", float, "penalty for repeated tokens (1.0 = none)"),
    ("--length-penalty", float, "beam search length penalty"),
    ("--no-repeat-ngram-size", int, "forbid repeating n-grams of this size"),
)


def _endpoint_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    g = parent.add_argument_group("endpoint")
    g.add_argument("--url", default=None, help="scoring URL (default $BLIP2_ENDPOINT_URL or http://127.0.0.1:5001/score)")
    g.add_argument("--key", default=None, help="endpoint key (default $BLIP2_ENDPOINT_KEY)")
    g.add_argument("--token", default=None, help="Azure AD token (default $BLIP2_ENDPOINT_TOKEN)")
    g.add_argument("--deployment", default=None, help="deployment to pin (default $BLIP2_ENDPOINT_DEPLOYMENT)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer (default 120)")
    gen = parent.add_argument_group("generation")
    for flag, kind, text in _GENERATION_FLAGS:
        gen.add_argument(flag, type=kind, default=None, help=text)
    gen.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam search")
    return parent


def generation_parameters(args: argparse.Namespace) -> dict:
    """The generation settings given on the command line, as endpoint parameters."""
    names = [flag[2:].replace("-", "_") for flag, _, _ in _GENERATION_FLAGS] + ["do_sample"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def client_from_args(args: argparse.Namespace) -> Blip2Client:
    return Blip2Client(url=args.url, key=args.key, token=args.token, deployment=args.deployment,
                       timeout=args.timeout)


def _print_answers(images: Sequence[str], questions: Sequence[str], answers: Sequence[str], as_json: bool) -> None:
    if as_json:
        rows = [{"image": i, "question": q, "text": a} for i, q, a in zip(images, questions, answers, strict=True)]
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif len(answers) == 1:
        print(answers[0])
    else:
        for image, answer in zip(images, answers, strict=True):
            print(f"{image}\t{answer}")


def _configure_ask(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file or http(s) URL")
    p.add_argument("-q", "--question", action="append", required=True,
                   help="question; repeat it for one question per image")
    p.add_argument("--raw-prompt", action="store_true", help='send the text as is, without "Question: ... Answer:"')
    p.add_argument("--json", action="store_true", help="print JSON rows with image, question and text")


def _run_ask(args: argparse.Namespace) -> int:
    images, questions = list(args.images), list(args.question)
    if len(questions) == 1:
        questions *= len(images)
    elif len(images) == 1:
        images *= len(questions)
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images and {len(questions)} questions; give one -q per image, or one -q")
    answers = client_from_args(args).ask(images, questions, raw_prompt=args.raw_prompt,
                                         **generation_parameters(args))
    _print_answers(images, questions, answers, args.json)
    return 0


def _configure_caption(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file or http(s) URL")
    p.add_argument("--json", action="store_true", help="print JSON rows with image and text")


def _run_caption(args: argparse.Namespace) -> int:
    answers = client_from_args(args).caption(args.images, **generation_parameters(args))
    _print_answers(args.images, [""] * len(answers), answers, args.json)
    return 0


def _configure_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="image file or http(s) URL")
    p.add_argument("--max-context-chars", type=int, default=800,
                   help="prompt budget in characters; the oldest turns are dropped to fit (default 800)")


def _run_chat(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    encode_image(args.image)  # fails early, with a clear message, on a missing file
    image = args.image if is_url(args.image) else Path(args.image).read_bytes()  # read once
    conversation = Conversation(max_chars=args.max_context_chars)
    params = generation_parameters(args)
    interactive = sys.stdin.isatty()
    status = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if question in ("/quit", "/exit"):
            break
        if question == "/reset":
            conversation.clear()
            continue
        if not question:
            continue
        try:
            print(client.chat(image, conversation, question, **params), flush=True)
        except EndpointError as exc:
            if exc.status not in (400, 413):
                raise
            _error(exc)  # this question was refused; the chat goes on
            status = 1
    return status


register_command("ask", Command("answer questions about images", _configure_ask, _run_ask))
register_command("caption", Command("caption images", _configure_caption, _run_caption))
register_command("chat", Command("chat about one image, reading questions from stdin", _configure_chat, _run_chat))
# `blip2 batch` = `blip2-batch`: runs the model on this machine (torch is imported only when it runs)
register_command("batch", Command(batch_cli.DESCRIPTION, batch_cli.configure, batch_cli.run, uses_endpoint=False))


def build_parser() -> argparse.ArgumentParser:
    """The ``blip2`` parser with one subparser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="blip2", description="Ask a BLIP-2 endpoint about images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    endpoint = _endpoint_options()
    for name, command in COMMANDS.items():
        parents = [endpoint] if command.uses_endpoint else []
        p = sub.add_parser(name, help=command.help, description=command.help, parents=parents)
        command.configure(p)
        p.set_defaults(_run=command.run)
    return parser


def _error(exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or exc.__class__.__name__
    print(f"blip2: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 usage; 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except (EndpointError, ValueError, TypeError, OSError) as exc:
        _error(exc)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
