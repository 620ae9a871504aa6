"""READ command-line demo: ask questions about an image and get the answer, the mask, the SasP points and the
[SEG]-image similarity.

Interactive (default): type an image path, then any number of questions about it; an empty question line goes
back to the image prompt, ``exit`` (or EOF / Ctrl-D / Ctrl-C) quits with status 0. A path that cannot be read is
reported and the loop goes on. Non-interactive: ``--image IMG --prompt "..." [--prompt ...] --out DIR``.

For each answer with a ``[SEG]`` three PNGs are written to ``--out``: ``<name>_mask.png`` (0/255),
``<name>_overlay.png`` (mask tint + SasP points: positive green, negative red, neutral grey) and
``<name>_heatmap.png`` (the full-resolution similarity of the first ``[SEG]`` over the image).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional, Protocol, Sequence

import numpy as np

from test_read import add_sasp_flags, answer_image_queries, prompt_ids, resolve_device, sasp_from_args
from utils.visualize import heatmap_image, load_image_rgb, overlay_image, write_mask_png, write_png

if TYPE_CHECKING:
    import torch

EXIT_WORDS = ("exit", "quit")


@dataclass
class DemoAnswer:
    """What the demo shows for one question (arrays in original-image pixels)."""

    text: str
    num_seg: int
    present: bool  # SESAME "see": a [SEG] was generated and its mask is non-empty
    mask: np.ndarray  # bool [H, W] (the first [SEG]'s; all False without [SEG])
    points: Optional[np.ndarray] = None  # float [P, 2] (x, y) of the first [SEG]
    labels: Optional[np.ndarray] = None  # int [P]: 1 positive, 0 negative, -1 neutral
    similarity: Optional[np.ndarray] = None  # float32 [H, W] full-resolution map of the first [SEG]


class Predictor(Protocol):
    """Anything that answers questions about one image at a time (the READ model, or a stand-in)."""

    def set_image(self, rgb: np.ndarray) -> None: ...

    def ask(self, question: str) -> DemoAnswer: ...


class READPredictor:
    """READ behind the demo: the prompt of the chosen template, SAM features cached per image."""

    def __init__(self, model: Any, tokenizer: Any, conv_type: str = "vicuna_v1", max_new_tokens: int = 512,
                 sasp_config: Any = None, image_size: int = 1024) -> None:
        from dataset.conversation import get_template
        from dataset.preprocess import ImagePreprocessor

        get_template(conv_type)  # one clear error for a bad --conv_type before the first question
        self.model, self.tokenizer = model, tokenizer
        self.conv_type, self.max_new_tokens = conv_type, max_new_tokens
        self.sasp_config = sasp_config if sasp_config is not None else model.config.sasp_config()
        self.preprocessor = ImagePreprocessor(sam_size=image_size)
        self._image: Any = None
        self._embedding: Optional["torch.Tensor"] = None

    def set_image(self, rgb: np.ndarray) -> None:
        self._image = self.preprocessor(rgb)
        self._embedding = None  # encoded lazily by the first question, then reused

    def ask(self, question: str) -> DemoAnswer:
        import torch

        from dataset.conversation import render_prompt
        from dataset.preprocess import sam_mask_shape
        from model.constants import DEFAULT_IMAGE_TOKEN
        from model.sasp import similarity_heatmap

        if self._image is None:
            raise RuntimeError("set_image() must come before ask()")
        prepared = self._image
        if self._embedding is None:
            device = next(self.model.parameters()).device
            self._embedding = self.model.encode_images_sam(prepared.image[None].to(device))
        prompt = render_prompt([(f"{DEFAULT_IMAGE_TOKEN}\n{question}", None)], self.conv_type)
        ids = prompt_ids([prompt], self.tokenizer, bool(self.model.config.mm_use_im_start_end))
        (res,) = answer_image_queries(self.model, prepared.image, prepared.image_clip, sam_mask_shape(prepared), ids,
                                      self.max_new_tokens, 1, self.sasp_config, image_embedding=self._embedding)
        answer = DemoAnswer(
            text=self.tokenizer.decode(res.token_ids, skip_special_tokens=True),
            num_seg=len(res.masks),
            present=bool(res.present),
            mask=res.mask.cpu().numpy().astype(bool),
        )
        if res.masks:
            answer.points = res.points[0].detach().cpu().numpy()
            answer.labels = res.point_labels[0].cpu().numpy()
            with torch.no_grad():
                answer.similarity = similarity_heatmap(res.similarity[0], prepared.original_size, self.sasp_config).cpu().numpy()
        return answer


def output_stem(image_path: str) -> str:
    """A filesystem-safe name from the image file name (extension dropped)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(image_path).stem) or "image"


def save_answer(out_dir: Path, name: str, rgb: np.ndarray, answer: DemoAnswer) -> list[Path]:
    """Write <name>_mask.png, <name>_overlay.png and <name>_heatmap.png; nothing when there is no [SEG]."""
    if answer.num_seg == 0:
        return []
    paths = [out_dir / f"{name}_{kind}.png" for kind in ("mask", "overlay", "heatmap")]
    write_mask_png(paths[0], answer.mask)
    write_png(paths[1], overlay_image(rgb, answer.mask, answer.points, answer.labels))
    sim = answer.similarity if answer.similarity is not None else np.zeros(answer.mask.shape, np.float32)
    write_png(paths[2], heatmap_image(sim, rgb))
    return paths


def report(answer: DemoAnswer, paths: Sequence[Path], out: IO[str]) -> None:
    print(f"ASSISTANT: {answer.text}", file=out)
    if answer.num_seg == 0:
        print("(no [SEG] in the answer: nothing was segmented, no files written)", file=out)
    else:
        print(f"* See (object present): {answer.present}", file=out)
        for p in paths:
            print(f"* saved {p}", file=out)
    out.flush()


class Session:
    """One image at a time; numbers the outputs so that asking twice never overwrites a file."""

    def __init__(self, predictor: Predictor, out_dir: Path, out: IO[str]) -> None:
        self.predictor, self.out_dir, self.out = predictor, Path(out_dir), out
        self.rgb: Optional[np.ndarray] = None
        self.stem = ""
        self.turn = 0

    def open_image(self, path: str) -> bool:
        try:
            rgb = load_image_rgb(path)
        except ValueError as err:
            print(f"Cannot use this image: {err}", file=self.out, flush=True)
            return False
        self.predictor.set_image(rgb)
        self.rgb, self.stem = rgb, output_stem(path)
        print(f"Loaded {path} ({rgb.shape[1]}x{rgb.shape[0]}).", file=self.out, flush=True)
        return True

    def ask(self, question: str, name: Optional[str] = None) -> DemoAnswer:
        assert self.rgb is not None
        self.turn += 1
        answer = self.predictor.ask(question)
        paths = save_answer(self.out_dir, name or f"{self.turn:03d}_{self.stem}", self.rgb, answer)
        report(answer, paths, self.out)
        return answer


def _read(prompt: str, inp: IO[str], out: IO[str]) -> Optional[str]:
    """One stripped line from ``inp`` after printing ``prompt``; None on EOF."""
    out.write(prompt)
    out.flush()
    line = inp.readline()
    if not line:
        out.write("\n")
        return None
    return line.strip()


def interactive(predictor: Predictor, out_dir: Path, inp: IO[str] = sys.stdin, out: IO[str] = sys.stdout) -> int:
    """The chat loop: image path, then questions; empty question -> new image; exit / EOF -> return 0."""
    session = Session(predictor, out_dir, out)
    print("READ demo. Enter an image path, then questions about it. An empty question asks for a new image; "
          "'exit' or Ctrl-D quits.", file=out, flush=True)
    try:
        while True:
            path = _read("Image path: ", inp, out)
            if path is None or path.lower() in EXIT_WORDS:
                return 0
            if not path or not session.open_image(path):
                continue
            while True:
                question = _read("Question: ", inp, out)
                if question is None or question.lower() in EXIT_WORDS:
                    return 0
                if not question:
                    break
                session.ask(question)
    except KeyboardInterrupt:
        print("", file=out)
        return 0


def run_once(predictor: Predictor, out_dir: Path, image: str, prompts: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """--image / --prompt mode: answer each prompt, write the PNGs, return 0 (2 if the image is unusable)."""
    session = Session(predictor, out_dir, out)
    if not session.open_image(image):
        return 2
    for k, question in enumerate(prompts):
        name = session.stem if len(prompts) == 1 else f"{session.stem}_{k:02d}"
        print(f"USER: {question}", file=out)
        session.ask(question, name=name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description="READ demo",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", "--pretrained_model_path", dest="version", required=True,
                   help="merged READ checkpoint directory (released layout)")
    p.add_argument("--vision_tower", default=None,
                   help="local CLIP ViT-L/14-336 directory; default: the path stored in the checkpoint config")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="model dtype")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    p.add_argument("--model_max_length", type=int, default=2048, help="tokenizer / model max length")
    p.add_argument("--max_new_tokens", type=int, default=512,
                   help="answer length limit (the original used --model_max_length for this)")
    p.add_argument("--conv_type", default="vicuna_v1",
                   help="prompt template: vicuna_v1 (what the original demo used) or llava_v1 (training)")
    p.add_argument("--image_size", type=int, default=1024, help="SAM input size")
    add_sasp_flags(p.add_argument_group("SasP (default: the checkpoint config's settings)"))
    p.add_argument("--out", "--vis_save_dir", dest="out", default="./demo_directory", help="where the PNGs go")
    p.add_argument("--image", default=None, help="non-interactive mode: the image to ask about")
    p.add_argument("--prompt", action="append", default=None,
                   help="non-interactive mode: a question (repeat for several); requires --image")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="selects the GPU under a launcher")
    return p


def load_predictor(args: argparse.Namespace) -> READPredictor:
    import torch

    from model.builder import load_read_for_inference

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    device = resolve_device(args.device, args.local_rank)
    try:
        tokenizer, model = load_read_for_inference(args.version, vision_tower=args.vision_tower, dtype=dtype,
                                                   device=str(device), model_max_length=args.model_max_length)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--version {args.version}: {err}") from None
    return READPredictor(model, tokenizer, args.conv_type, args.max_new_tokens, sasp_from_args(args, model.config),
                         args.image_size)


def main(argv: Optional[Sequence[str]] = None, inp: IO[str] = sys.stdin, out: IO[str] = sys.stdout) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")  # e.g. what was loaded from where
    if bool(args.image) != bool(args.prompt):
        parser.error("non-interactive mode needs both --image and --prompt")
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    predictor = load_predictor(args)
    out_dir = Path(args.out)
    if args.image:
        return run_once(predictor, out_dir, args.image, args.prompt, out)
    return interactive(predictor, out_dir, inp, out)


if __name__ == "__main__":
    sys.exit(main())
