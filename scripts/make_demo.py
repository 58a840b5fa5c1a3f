"""Build demo/pydoc-moe: a tiny ERNIE 4.5 MoE trained from scratch on the Python 3.11 documentation, so that
`moelm generate --model demo/pydoc-moe --prompt "The list"` prints readable English offline.

    python scripts/make_demo.py --out demo/pydoc-moe

Steps 1-3 are skipped when their outputs are already in --work (unless --fresh):
 1. `apt-get download python3.11-doc` (Debian; PSF License Version 2) and `dpkg-deb -x` it;
 2. the reST sources (html/_sources/**/*.rst.txt but the release notes, whatsnew/) cleaned into plain prose: one
    JSONL record per page (corpus.jsonl; every 50th page goes to val.jsonl instead);
 3. a byte-level BPE tokenizer trained on the training pages (moelm.models.scaffold.train_tokenizer / save_tokenizer:
    the ERNIE special tokens and chat template of `moelm new`);
 4. `moelm finetune recipes/demo_pydoc.yaml` (from scratch: a named config with config_overrides), timed;
 5. the final model copied to --out in bfloat16 with a sampling generation_config, the package's copyright file
    (COPYRIGHT.python3.11-doc), training.json (time, CPU, losses, corpus sizes, samples, the MTP head's acceptance
    as a drafter on the validation pages) and README.md.
Extra `--section.key=value` arguments are passed to the recipe (e.g. --step.max_steps=50 for a quick run).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT = f"usr/share/doc/{PACKAGE}/copyright"
VERSION = "3.11"  # |version| and |release| in the sources
VAL_EVERY = 50  # every 50th page (sorted by path) is held out for validation
EXCLUDE = ("whatsnew/",)  # release notes: lists of changes, contributor names and issue numbers rather than prose

# ---- reST -> plain text ---------------------------------------------------------------------------------------

# Directives dropped with their whole body (code, tables, indexes, metadata).
DROP = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "testsetup", "testcleanup",
        "productionlist", "literalinclude", "highlight", "toctree", "index", "raw", "parsed-literal", "math",
        "image", "figure", "csv-table", "list-table", "table", "tabularcolumns", "include", "module",
        "currentmodule", "sectionauthor", "moduleauthor", "audit-event", "audit-event-table", "miscnews",
        "limited-api-list", "contents", "program", "only"}
# Directives whose argument is prose (kept as the first paragraph of the body).
TITLED = {"note", "warning", "seealso", "important", "tip", "caution", "attention", "hint", "admonition", "rubric",
          "topic", "sidebar", "epigraph", "impl-detail", "glossary"}
VERSIONED = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
             "deprecated": "Deprecated since version {}:"}

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:.-]*)::\s*(.*)$")
EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, targets, footnotes, substitution definitions
SUBST_DEF = re.compile(r"^\s*\.\.\s+\|([^|]+)\|\s+replace::\s*(.*)$")
OPTION = re.compile(r"^\s*:[\w-][\w -]*:(\s.*)?$")  # directive options and field lists
ADORNMENT = re.compile(r"^\s*([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")  # section title over/underlines
SIMPLE_TABLE = re.compile(r"^\s*=+( +=+)+\s*$")
GRID_TABLE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\|)\s*$")
BULLET = re.compile(r"^([-*+•]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`((?:[^`\\]|\\.)+)`")
LITERAL = re.compile(r"``(.+?)``")
LINK = re.compile(r"`([^`<]*?)\s*(?:<[^`>]*>)?`__?")
FOOTNOTE_REF = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
STRONG = re.compile(r"(?<![\w*\\])\*\*(?!\s)(.+?)(?<!\s)\*\*(?![\w*])")
EMPHASIS = re.compile(r"(?<![\w*\\])\*(?!\s)([^*]+?)(?<!\s)\*(?![\w*])")
SUBSTITUTION = re.compile(r"\|([\w][\w -]*)\|_{0,2}")


def _role(kind: str, text: str) -> str:
    text = text.replace("\\", "")
    titled = re.fullmatch(r"(.*?)\s*<([^<>]*)>", text, re.S)
    if kind == "abbr":
        return re.sub(r"\s*\(.*\)$", "", text, flags=re.S)
    if titled and titled.group(1):
        return titled.group(1)
    target = titled.group(2) if titled else text
    if kind in ("pep", "rfc"):
        return f"{kind.upper()} {target.split('#')[0]}"
    if kind in ("issue", "gh"):
        return f"{'bpo' if kind == 'issue' else 'gh'}-{target}"
    if kind == "ref":
        return target.replace("-", " ").replace("_", " ")
    if kind in ("samp", "file"):
        return target.replace("{", "").replace("}", "")
    target = target.lstrip("!")
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    target = target.lstrip(".")
    if kind in ("func", "meth") and not target.endswith(")"):
        target += "()"  # as Sphinx renders them
    return target


def inline(text: str, substitutions: dict[str, str]) -> str:
    """Inline markup to plain text: roles, ``literals``, `links`_, *emphasis*, **strong**, |substitutions|."""
    kept: list[str] = []

    def keep(s: str) -> str:  # shield literal text from the emphasis rules
        kept.append(s)
        return f"\x00{len(kept) - 1}\x00"

    text = FOOTNOTE_REF.sub("", text)
    text = LITERAL.sub(lambda m: keep(m.group(1)), text)
    text = ROLE.sub(lambda m: keep(_role(m.group(1), m.group(2))), text)
    text = LINK.sub(lambda m: m.group(1), text)
    text = SUBSTITUTION.sub(lambda m: keep(substitutions.get(m.group(1), m.group(1))), text)
    text = STRONG.sub(r"\1", text)
    text = EMPHASIS.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    text = re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], text)  # a literal inside a substitution
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def clean_rst(source: str) -> str:
    """A reST page of the Python docs as plain prose: paragraphs (unwrapped) separated by blank lines; headings kept
    as paragraphs of their own; code (literal blocks, doctests, code directives), tables, comments, indexes and
    directive options dropped; admonitions and version notes kept as prose. Deterministic."""
    lines = source.expandtabs(8).splitlines()
    substitutions = {"version": VERSION, "release": VERSION, "today": ""}
    for line in lines:
        m = SUBST_DEF.match(line)
        if m:
            substitutions[m.group(1)] = LITERAL.sub(r"\1", m.group(2)).strip()
    out: list[tuple[int, str]] = []  # (indent, text); "" = paragraph break
    i, n = 0, len(lines)

    def skip_block(start: int, base: int) -> int:
        """The index after the block of lines more indented than `base` (or blank) from `start`."""
        j = start
        while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        return j

    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            out.append((0, ""))
            i += 1
            continue
        base = _indent(line)
        m = DIRECTIVE.match(line)
        if m:
            name = m.group(2).lower().split(":")[-1]
            arg = m.group(3).strip()
            if name in DROP or name.endswith("replace") or m.group(2).lower() in DROP:
                i = skip_block(i + 1, base)
                continue
            i += 1
            while i < n and lines[i].strip() and _indent(lines[i]) > base and OPTION.match(lines[i]):
                i += 1  # the directive's options
            out.append((0, ""))
            if name in VERSIONED:
                version, _, rest = arg.partition(" ")
                out.append((base, VERSIONED[name].format(version) + (" " + rest if rest else "")))
            elif name == "deprecated-removed":
                parts = arg.split(" ", 2)
                head = f"Deprecated since version {parts[0]}, will be removed in version {parts[1]}:" \
                    if len(parts) > 1 else f"Deprecated since version {arg}:"
                out.append((base, head + (" " + parts[2] if len(parts) > 2 else "")))
            elif name == "availability":
                out.append((base, f"Availability: {arg}"))
            elif name in TITLED and arg:
                out.append((base, arg))
                out.append((0, ""))
            continue
        if EXPLICIT.match(line):  # comment, target, footnote, substitution definition: dropped with its body
            i = skip_block(i + 1, base)
            continue
        if stripped.startswith(">>>"):  # a doctest block: to the next blank line
            while i < n and lines[i].strip():
                i += 1
            continue
        if ADORNMENT.match(line) and not SIMPLE_TABLE.match(line):
            out.append((0, ""))
            i += 1
            continue
        if SIMPLE_TABLE.match(line) or GRID_TABLE.match(line):  # a table: to the next blank line
            while i < n and lines[i].strip():
                i += 1
            continue
        if OPTION.match(line):  # a field list item (":Author: ...")
            i = skip_block(i + 1, base)
            continue
        if stripped.endswith("::"):  # a paragraph introducing a literal block
            text = stripped[:-2].rstrip()
            if text and not stripped[:-2].endswith(" "):
                text += ":"
            if text:
                out.append((base, text))
            i = skip_block(i + 1, base)
            out.append((0, ""))
            continue
        out.append((base, stripped))
        i += 1
    # paragraphs: consecutive lines joined; a new line at each list bullet and at a definition (a deeper indent)
    paragraphs, current, line_indent, in_item = [], [], 0, False
    for indent, text in out + [(0, "")]:
        if not text:
            if current:
                paragraphs.append("\n".join(inline(p, substitutions) for p in current))
            current = []
        elif BULLET.match(text) or not current or (indent > line_indent and not in_item):
            in_item = bool(BULLET.match(text))
            current.append(BULLET.sub("- ", text) if in_item and not re.match(r"\d+\.", text) else text)
            line_indent = indent
        else:
            current[-1] += " " + text
    paragraphs = [p for p in (re.sub(r"\n+", "\n", p).strip() for p in paragraphs) if _prose(p)]
    return "\n\n".join(paragraphs)


def _prose(paragraph: str) -> bool:
    """Keeps paragraphs with some letters (drops leftovers such as a lone '-' or a table fragment)."""
    letters = sum(c.isalpha() for c in paragraph)
    return letters >= 2 and letters >= 0.3 * len(paragraph)


# ---- the steps ------------------------------------------------------------------------------------------------

def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def fetch_docs(work: Path, deb: str | None) -> tuple[Path, str]:
    """The extracted package root and the .deb's version (apt-get download into work/deb unless `deb` is given)."""
    if deb is None:
        debs = sorted((work / "deb").glob(f"{PACKAGE}_*.deb"))
        if not debs:
            (work / "deb").mkdir(parents=True, exist_ok=True)
            run(["apt-get", "download", PACKAGE], cwd=work / "deb")
            debs = sorted((work / "deb").glob(f"{PACKAGE}_*.deb"))
        deb = str(debs[-1])
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    root = work / "pkg"
    if not (root / SOURCES).is_dir():
        shutil.rmtree(root, ignore_errors=True)
        run(["dpkg-deb", "-x", deb, str(root)])
    return root, version


def build_corpus(root: Path, work: Path) -> dict:
    """corpus.jsonl / val.jsonl: {"text": page} per reST page (sorted by path; every VAL_EVERY-th to val)."""
    base = root / SOURCES
    pages = sorted(p for p in glob.glob(str(base / "**" / "*.rst.txt"), recursive=True)
                   if not Path(p).relative_to(base).as_posix().startswith(EXCLUDE))
    stats = {"pages": len(pages), "excluded": list(EXCLUDE), "source_bytes": 0, "train_pages": 0, "val_pages": 0,
             "train_bytes": 0, "val_bytes": 0}
    with open(work / "corpus.jsonl", "w", encoding="utf-8") as train, \
            open(work / "val.jsonl", "w", encoding="utf-8") as val:
        for k, page in enumerate(pages):
            source = Path(page).read_text(encoding="utf-8")
            stats["source_bytes"] += len(source.encode())
            text = clean_rst(source)
            if not text:
                continue
            split = "val" if k % VAL_EVERY == VAL_EVERY - 1 else "train"
            (val if split == "val" else train).write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            stats[f"{split}_pages"] += 1
            stats[f"{split}_bytes"] += len(text.encode())
    return stats


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def build_tokenizer(recipe, work: Path) -> dict:
    """A byte-level BPE of the recipe's vocab_size on the training pages, saved as moelm new saves its tokenizer."""
    from moelm.models.scaffold import SPECIALS, family_of, save_tokenizer, train_tokenizer

    config = model_config(recipe)
    texts = read_texts(work / "corpus.jsonl")
    tok = train_tokenizer(config.vocab_size, SPECIALS[family_of(config)], corpus=texts)
    save_tokenizer(tok, config, recipe.model.tokenizer)
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    val_tokens = sum(len(e.ids) for e in tok.encode_batch(read_texts(work / "val.jsonl"), add_special_tokens=False))
    return {"vocab_size": tok.get_vocab_size(), "train_tokens": tokens, "val_tokens": val_tokens}


def model_config(recipe):
    """The recipe's named config with its config_overrides (as the trainer builds it)."""
    from moelm.config import named_config

    config = named_config(recipe.model.name_or_path)
    for key, value in recipe.model.config_overrides.items():
        setattr(config, key, value)
    return config


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def train(recipe_path: Path, overrides: list[str], run_dir: Path) -> dict:
    """`moelm finetune` in a subprocess, timed; the load average before and after."""
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = run([sys.executable, "-m", "moelm", "finetune", str(recipe_path), *overrides],
               stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    losses = [m for m in metrics if "loss" in m]
    result = {"wall_s": round(seconds, 1), "cpu_s": round(cpu_s, 1), "train_s": round(losses[-1]["elapsed_s"], 1),
              "steps": summary["steps"], "last_loss": round(losses[-1]["loss"], 4),
              "final_loss": round(sum(m["loss"] for m in losses[-10:]) / len(losses[-10:]), 4),
              "val_loss": round(metrics[-1].get("val_loss", float("nan")), 4),
              "val_perplexity": round(metrics[-1].get("val_perplexity", float("nan")), 2)}
    if "mtp_loss" in losses[-1]:  # the MTP head's loss (the token after the next), as the main loss's
        result |= {"last_mtp_loss": round(losses[-1]["mtp_loss"], 4),
                   "final_mtp_loss": round(sum(m["mtp_loss"] for m in losses[-10:]) / len(losses[-10:]), 4),
                   "val_mtp_loss": round(metrics[-1].get("val_mtp_loss", float("nan")), 4)}
    return result | {
        "tokens_per_s": round(losses[-1]["tokens_per_s"]), "tokens_seen": summary["steps"] * losses[-1]["tokens"],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()}


GENERATION = dict(do_sample=True, temperature=0.75, top_p=0.9, top_k=50, repetition_penalty=1.15,
                  max_new_tokens=120)
PROMPTS = ["The list", "A dictionary is", "To open a file"]


def export(final: Path, out: Path, dtype: str) -> None:
    """The final model in `dtype` with the demo's generation_config and the tokenizer, into `out` (replaced)."""
    import torch

    from moelm.models.auto import AutoModelForCausalLM
    from moelm.models.scaffold import SPECIALS
    from moelm.text.tokenizer import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final, dtype=getattr(torch, dtype), fast=False)
    stop = SPECIALS["ernie"].index("<|end_of_sentence|>")
    model.generation_config.update(eos_token_id=[model.config.eos_token_id, stop],
                                   pad_token_id=model.config.pad_token_id, **GENERATION)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(final).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def samples(model_dir: Path, dtype: str, seed: int = 0) -> list[dict]:
    """What `moelm generate --model DIR --prompt P --seed 0 --max-new-tokens N --dtype D` prints for PROMPTS."""
    result = []
    for prompt in PROMPTS:
        cmd = [sys.executable, "-m", "moelm", "generate", "--model", str(model_dir), "--prompt", prompt, "--seed",
               str(seed), "--max-new-tokens", str(GENERATION["max_new_tokens"]), "--dtype", dtype]
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result.append({"prompt": prompt, "dtype": dtype, "output": text.rstrip("\n")})
    return result


def parameter_counts(model_dir: Path) -> dict:
    """Total parameters (the checkpoint's tensors, the tied embedding once), those active per token (the routed
    experts beyond moe_k and the MTP head, which only drafting runs, not counted) and the MTP head's."""
    from moelm.config import AutoConfig
    from moelm.io.weights import SafetensorsCheckpoint

    c = AutoConfig.from_pretrained(model_dir)
    with SafetensorsCheckpoint(model_dir) as ckpt:
        total = sum(math.prod(ckpt.shape(name)) for name in ckpt.keys())
        mtp = sum(math.prod(ckpt.shape(name)) for name in ckpt.keys() if name.startswith("model.mtp_"))
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    idle = moe_layers * (c.moe_num_experts - c.moe_k) * 3 * c.hidden_size * c.moe_intermediate_size
    return {"total": total, "active": total - idle - mtp, "embedding": c.vocab_size * c.hidden_size,
            "mtp_head": mtp}


SPECULATIVE = dict(prompts_per_page=3, prompt_tokens=48, max_new_tokens=64)


def mtp_acceptance(model_dir: Path, val_path: Path) -> dict | None:
    """The MTP head as a drafter on the validation pages (None: the model has no head): greedy
    generate(..., speculative="mtp") from prompts cut from each page (its prompt_tokens tokens from 1/4, 1/2 and 3/4
    of the way in), drafting at every step (speculative.Always, as the tests measure a drafter's own acceptance;
    generate's default Pace stops drafting while drafts do not pay), plain greedy and with the demo's repetition
    penalty. From moelm.generation.speculative.last_run, summed over the prompts: drafts proposed and kept
    (acceptance = kept / proposed) and the new tokens per check of the model; every run's tokens are checked equal
    to plain greedy decoding's. In float32 (the stored bfloat16 weights, upcast exactly): in bfloat16 a check of
    several tokens rounds differently from one-token steps, and near-ties (top-2 logits within one bfloat16 step)
    then go the other way in a few of these runs."""
    import torch

    from moelm.generation import speculative
    from moelm.models.auto import AutoModelForCausalLM
    from moelm.text.tokenizer import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if model.mtp is None:
        return None
    tok = AutoTokenizer.from_pretrained(model_dir)
    n, size, new = SPECULATIVE["prompts_per_page"], SPECULATIVE["prompt_tokens"], SPECULATIVE["max_new_tokens"]
    prompts = []
    for text in read_texts(val_path):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for j in range(1, n + 1):
            start = min(j * len(ids) // (n + 1), max(0, len(ids) - size))
            prompts.append(torch.tensor([ids[start:start + size]]))
    result = {"prompts": len(prompts), "prompt_tokens": size, "max_new_tokens": new, "dtype": "float32"}
    real_pace = speculative.Pace
    speculative.Pace = speculative.Always
    try:
        for label, penalty in (("greedy", 1.0), ("greedy_repetition_penalty", GENERATION["repetition_penalty"])):
            counts = dict.fromkeys(("new_tokens", "checks", "proposed", "kept"), 0)
            for ids in prompts:
                kw = dict(max_new_tokens=new, do_sample=False, repetition_penalty=penalty)
                plain = model.generate(ids, **kw)
                speculative.last_run.clear()  # (not reset when the prompt's own next token ends generation)
                drafted = model.generate(ids, speculative="mtp", **kw)
                if not torch.equal(plain, drafted):
                    raise AssertionError("speculative='mtp' gave other tokens than plain greedy decoding")
                run = speculative.last_run
                counts["new_tokens"] += drafted.shape[1] - ids.shape[1]
                counts["checks"] += run.get("steps", 0) + 1  # the prompt's forward gives the first new token
                counts["proposed"] += run.get("proposed", 0)
                counts["kept"] += run.get("kept", 0)
            counts["acceptance"] = round(counts["kept"] / max(counts["proposed"], 1), 4)
            counts["tokens_per_check"] = round(counts["new_tokens"] / counts["checks"], 3)
            result[label] = dict(counts, repetition_penalty=penalty)
    finally:
        speculative.Pace = real_pace
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other --section.key=value arguments override recipe keys.")
    parser.add_argument("--out", default="demo/pydoc-moe", help="where the demo model goes (replaced)")
    parser.add_argument("--work", default="build/demo_pydoc",
                        help="downloads, corpus, tokenizer and the training run (dataset, tokenizer and checkpoint "
                             "paths of the recipe are set under it)")
    parser.add_argument("--recipe", default="recipes/demo_pydoc.yaml")
    parser.add_argument("--deb", default=None, help=f"a {PACKAGE} .deb to use instead of apt-get download")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the exported weights' dtype (training is float32)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the corpus and tokenizer too")
    parser.add_argument("--prepare-only", action="store_true", help="stop after the corpus and the tokenizer")
    parser.add_argument("--skip-train", action="store_true", help="export the last training run in --work again")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    sys.path.insert(0, str(ROOT / "src"))
    from moelm.train.recipe import load_recipe

    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"--dataset.path={work / 'corpus.jsonl'}", f"--validation_dataset.path={work / 'val.jsonl'}",
                 f"--model.tokenizer={work / 'tokenizer'}", f"--checkpoint.dir={work / 'run'}", *overrides]
    recipe_path = Path(args.recipe).resolve()
    recipe = load_recipe(recipe_path, overrides)

    root, deb_version = fetch_docs(work, args.deb)
    info_path = work / "data.json"
    vocab_size = model_config(recipe).vocab_size
    if args.fresh or not info_path.is_file() or json.loads(info_path.read_text()).get("vocab_size") != vocab_size \
            or not (work / "tokenizer" / "tokenizer.json").is_file():
        data = build_corpus(root, work)
        data |= build_tokenizer(recipe, work)
        data["package"] = f"{PACKAGE} {deb_version}"
        info_path.write_text(json.dumps(data, indent=1) + "\n")
    data = json.loads(info_path.read_text())
    print(json.dumps(data), file=sys.stderr)
    if args.prepare_only:
        return

    env_src = str(ROOT / "src")
    os.environ["PYTHONPATH"] = env_src + os.pathsep + os.environ.get("PYTHONPATH", "")
    if args.skip_train:  # export the last run again (e.g. after changing the README or generation settings)
        training = json.loads((work / "run" / "training.json").read_text())
    else:
        training = train(recipe_path, overrides, work / "run")
        (work / "run" / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    print(json.dumps(training), file=sys.stderr)
    export(work / "run" / "final", out, args.dtype)
    shutil.copyfile(root / COPYRIGHT, out / f"COPYRIGHT.{PACKAGE}")
    command = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--skip-train")
    info = {"out": os.path.relpath(out, ROOT), "command": f"python scripts/make_demo.py {command}".rstrip(),
            "recipe": os.path.relpath(recipe_path, ROOT), "data": data, "training": training,
            "parameters": parameter_counts(out), "dtype": args.dtype,
            "speculative_mtp": mtp_acceptance(out, work / "val.jsonl"),
            "samples": samples(out, args.dtype) + samples(out, "float32")}
    (out / "training.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    write_readme(out, info, recipe)
    print(f"{out}: {json.dumps(info['parameters'])}", file=sys.stderr)


COPYRIGHT_NOTICE = ("Copyright © 2001-2023 Python Software Foundation. All rights reserved. Copyright © 2000 "
                    "BeOpen.com. All rights reserved. Copyright © 1995-2000 Corporation for National Research "
                    "Initiatives. All rights reserved. Copyright © 1991-1995 Stichting Mathematisch Centrum. All "
                    "rights reserved.")


def write_readme(out: Path, info: dict, recipe) -> None:
    from moelm.config import AutoConfig

    c = AutoConfig.from_pretrained(out)  # as trained (the config.json written by finetune)
    moe_layers = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    layout = f"layers {moe_layers[0]}-{moe_layers[-1]} MoE, the others dense" if moe_layers else "all dense"
    d, t, n = info["data"], info["training"], info["parameters"]
    step = recipe.step
    tokens_per_step = step.global_batch_size * recipe.dataset.seq_length
    epochs = t["steps"] * tokens_per_step / d["train_tokens"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    load = " / ".join(f"{x:g}" for x in t["loadavg_after"])
    busy = max(t["loadavg_before"][0], t["loadavg_after"][0]) > t["cpu_count"] + 0.5
    shared = ": other jobs were using the same cores" if busy else ""
    shown = [x for x in info["samples"] if x["dtype"] == info["dtype"]] + \
        [x for x in info["samples"] if x["dtype"] != info["dtype"]][:1]
    samples_md = "\n".join(
        f"```\n$ moelm generate --model {info['out']} --prompt \"{s['prompt']}\" --seed 0 "
        f"--max-new-tokens {GENERATION['max_new_tokens']}{'' if s['dtype'] == info['dtype'] else ' --dtype ' + s['dtype']}"
        f"\n{s['prompt']}{s['output']}\n```\n" for s in shown)
    spec = info.get("speculative_mtp")
    head = n.get("mtp_head", 0)
    mtp_intro = f"""
It has ERNIE's multi-token-prediction (MTP) head ({head / 1e6:.2f}M parameters of the total), trained with the
model, for speculative decoding: `model.generate(..., speculative="mtp")` (the head drafts the token after the next
from the model's last hidden state, the model checks it in its next forward; greedy decoding gives the same tokens
as without it in float32, and in bfloat16 up to rounding: a check of several tokens rounds differently from one-token
steps, which can break a near-tie the other way).
""" if head else ""
    if head and spec:
        g, r = spec["greedy"], spec["greedy_repetition_penalty"]
        mtp_intro += f"""On {spec['prompts']} prompts cut from the validation pages, greedy in {spec['dtype']},
the model kept {g['acceptance']:.0%} of the head's drafts ({g['tokens_per_check']:.2f} new tokens per forward of the
model; {r['acceptance']:.0%} with the demo's repetition penalty {r['repetition_penalty']:g}).
"""
    head_part = f", {head:,} the MTP head's" if head else ""
    mtp_train = (f" ERNIE's MTP head (`num_nextn_predict_layers: 1`: a dense decoder layer, a 2H -> H projection and "
                 f"two norms, sharing the embedding, final norm and LM head) trained jointly, its loss (the token "
                 f"after the next) weighted {recipe.moe.mtp_loss_coef:g}.") if head else ""
    rows = ""
    if "val_mtp_loss" in t:
        rows += (f"| MTP head loss | {t['final_mtp_loss']:.3f} in training (averaged as the training loss); "
                 f"{t['val_mtp_loss']:.3f} on the held-out pages (the token after the next) |\n")
    if head and spec:
        rows += (f"| MTP drafts kept | {g['acceptance']:.1%} ({g['kept']} of {g['proposed']}), greedy, "
                 f"{g['tokens_per_check']:.2f} new tokens per forward; {r['acceptance']:.1%} with repetition penalty "
                 f"{r['repetition_penalty']:g}: {spec['prompts']} prompts of {spec['prompt_tokens']} tokens from the "
                 f"held-out pages, up to {spec['max_new_tokens']} new tokens each, a draft at every step, "
                 f"{spec['dtype']}, the tokens checked equal to plain greedy decoding's |\n")
    text = f"""# pydoc-moe: a tiny ERNIE 4.5 MoE trained on the Python documentation

A demo checkpoint for moelm: an `ernie4_5_moe` model of {n['total'] / 1e6:.2f}M parameters ({n['active'] / 1e6:.2f}M
active per token) trained from scratch in {t['wall_s'] / 60:.1f} minutes on two CPU cores, on the text of the
Python 3.11 documentation. It writes Python-documentation-flavoured English; it knows nothing and is only meant for
trying moelm offline (generate, chat, serve, finetune) with output that reads like text rather than random tokens.

```
moelm generate --model {info['out']} --prompt "The list"
```
{mtp_intro}
## How it was made

One command, from the repository root (needs `apt-get` and `dpkg-deb`, i.e. Debian or Ubuntu, and network access
to the Debian archive):

```
{info['command']}
```

[scripts/make_demo.py](../../scripts/make_demo.py) does everything:

1. Corpus: `apt-get download {PACKAGE}` (here `{d['package']}`), `dpkg-deb -x`, and the {d['pages']} reStructuredText
   sources under `{SOURCES}/` ({d['source_bytes'] / 1e6:.1f} MB; all but the release notes, {', '.join(f'`{x}`' for x in d['excluded'])}) cleaned into plain prose: role markup (``:func:`len` ``
   -> `len()`, ``:pep:`8` `` -> `PEP 8`), literals, emphasis and links unwrapped; headings kept as lines of their own
   (underlines dropped); paragraphs unwrapped; code (literal blocks after `::`, doctests, `code-block` and the like),
   tables, comments, index entries and directive options dropped; notes, `versionadded`/`versionchanged` and
   descriptions of functions and classes kept as prose (without their signatures). One JSONL record per page; every
   {VAL_EVERY}th page is held out for validation: {d['train_pages']} pages, {d['train_bytes'] / 1e6:.2f} MB,
   {d['train_tokens']:,} tokens for training; {d['val_pages']} pages, {d['val_tokens']:,} tokens for validation.
2. Tokenizer: byte-level BPE with a {d['vocab_size']}-token vocabulary trained on the training pages with the
   `tokenizers` package (`moelm.models.scaffold.train_tokenizer`; the ERNIE special tokens and chat template of `moelm new`).
3. Training: `moelm finetune {info['recipe']}` from a random initialisation of the named config `ernie4_5_moe-tiny`
   with the recipe's `config_overrides`: {c.num_hidden_layers} layers ({layout}),
   hidden size {c.hidden_size}, {c.num_attention_heads} attention heads ({c.num_key_value_heads} KV heads) of
   {c.head_dim}, {c.moe_num_experts} routed experts (top-{c.moe_k}) of width {c.moe_intermediate_size} and
   {c.moe_num_shared_experts} shared expert per MoE layer, dense width {c.intermediate_size}, tied embeddings, vocabulary {c.vocab_size}. Parameters: {n['total']:,}
   in all, {n['active']:,} active per token ({n['embedding']:,} of them the embedding){head_part}.
   {t['steps']} steps of {step.global_batch_size} x {recipe.dataset.seq_length} tokens (packed text, pages joined
   with `</s>`): {t['tokens_seen']:,} tokens, {epochs:.2f} epochs; AdamW lr {recipe.optimizer.lr:g} (warmup
   {recipe.lr_scheduler.warmup_steps}, {recipe.lr_scheduler.decay} to {recipe.lr_scheduler.min_lr:g}), weight decay
   {recipe.optimizer.weight_decay:g}, aux loss {recipe.moe.aux_loss_coef}, float32.{mtp_train}
4. Export: the final model in {info['dtype']} (moelm and transformers load it in any dtype) with a
   `generation_config.json` that samples (temperature {GENERATION['temperature']}, top_p {GENERATION['top_p']},
   top_k {GENERATION['top_k']}, repetition penalty {GENERATION['repetition_penalty']}, at most
   {GENERATION['max_new_tokens']} new tokens; `moelm generate` asks for 256 unless given `--max-new-tokens`) and
   stops at `</s>` or `<|end_of_sentence|>`; `training.json` holds the numbers below.

| | |
|---|---|
| training wall time | {t['wall_s']:.0f} s ({t['wall_s'] / 60:.1f} min) for `moelm finetune` in all (data loading, {t['steps']} steps, validation, saving) |
| CPU | {t['cpu']}, {t['cpu_count']} cores, torch {t['torch_threads']} threads; {t['cpu_s']:.0f} s of CPU time |
| machine load | load average {' / '.join(f'{x:g}' for x in t['loadavg_before'])} (1/5/15 min) before, {load} after{shared} |
| throughput | {t['tokens_per_s']} tokens/s (training steps) |
| final training loss | {t['last_loss']:.3f} at step {t['steps']}; {t['final_loss']:.3f} averaged over the last 10 logged steps (every {step.log_every_steps}th) |
| validation loss | {t['val_loss']:.3f} (perplexity {t['val_perplexity']:.1f}) on the {d['val_pages']} held-out pages |
{rows}| size | {size / 1e6:.1f} MB on disk ({info['dtype']} weights {sum(f.stat().st_size for f in out.glob('*.safetensors')) / 1e6:.1f} MB) |

## Samples

With the model's generation_config and `--seed 0`, in {info['dtype']} as stored, then one in float32 (all in
`training.json`):

{samples_md}
## License

The training text is the documentation in Debian's `{PACKAGE}` package (`{d['package']}`). Its
`usr/share/doc/{PACKAGE}/copyright` file, copied unchanged here as [COPYRIGHT.{PACKAGE}](COPYRIGHT.{PACKAGE}), gives
the Python license, whose terms are the **PSF License Agreement
(PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2)**, covering "Python ... in source or binary form and its associated
documentation": a nonexclusive, royalty-free, world-wide license to reproduce, analyze, test, perform and/or display
publicly, prepare derivative works, distribute, and otherwise use it, provided the PSF license and copyright notice
are retained and a derivative work includes a brief summary of the changes made; provided "AS IS", without warranty.
The documentation's own license page (`license.rst`) says the same: "Python software and documentation are licensed
under the PSF License Agreement", and since Python 3.8.6 "examples, recipes, and other code in the documentation are
dual licensed under the PSF License Agreement and the Zero-Clause BSD license". The copyright file also carries the
historical BeOpen, CNRI and CWI license agreements of older Python releases and the licenses of software incorporated
in Python; its one documentation-specific grant of another kind (GNU GPL) is for libffi's documentation, which is
not part of this corpus.

The documentation's copyright notice (`copyright.rst`): {COPYRIGHT_NOTICE}

Summary of the changes made: the reST sources were converted to plain text as described above (markup removed,
code and tables dropped) and used to train this model and its tokenizer, which are distributed
under the terms of the PSF License Agreement (its full text is in COPYRIGHT.{PACKAGE}).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
