"""VLM judges on the two backends of ``vlm_yes_prob`` (a transformers VLM or an OpenAI-compatible server, see
:class:`diffrl.rewards.vlm.VLMBackend`): UnifiedReward's pointwise score, and two pairwise judges with their group
win-rate rewards.

**``unifiedreward``** (:class:`UnifiedRewardScore`, a pointwise :class:`~diffrl.rewards.Reward`). The VLM, by default
``CodeGoat24/UnifiedReward-qwen-7b`` (Qwen2.5-VL-7B fine-tuned as a reward model), gets the image and UnifiedReward's
pointwise image-generation prompt (:data:`UNIFIEDREWARD_POINT_TEMPLATE`, verbatim from
``github.com/CodeGoat24/UnifiedReward``, ``inference_qwen/image_generation/qwen_point_score_image_generation.py``): it
lists the prompt's elements as ``element (type): 0/1`` and ends with ``Final Score:`` and a score from 1 to 5. The
answer is generated greedily (at most ``max_new_tokens``, 512 as in the reference) and parsed as the same repository
does (``DiffusionDPO/sift_dpo_data.py``, ``point_score``): the text after the last ``Final Score:`` (the whole answer
when the marker is missing), its first run of digits as an integer, and **0 when there is none**. The reward is that
number divided by ``max_score`` (5), so it lies in [0, 1] (Flow-GRPO's ``unifiedreward_score_sglang`` divides by 5
too). Every answer is counted in :attr:`UnifiedRewardScore.stats`: ``unparsed`` (no digits: scored 0, as the
reference does, or an error with ``unparsed="raise"``), ``no_marker`` (no ``Final Score:``: read from the whole
answer, as the reference does) and ``out_of_range`` (a number above ``max_score``, e.g. a year: scored 0 like an
unparsed answer, where the reference would keep it; a deviation, so that one odd answer cannot dwarf a batch). A
warning is logged for each batch with unparsed answers.

**Pairwise judges** (:class:`~diffrl.rewards.pairwise.PairwiseReward`), both shown the two images in one user turn,
``image a`` first:

* ``vlm_pairwise`` (:class:`VLMPairwiseJudge`, RewardDance style: the reward is the VLM's probability of "yes",
  [arXiv:2509.08826](https://arxiv.org/abs/2509.08826)): P(yes) of the first answer token to
  :data:`PAIR_QUESTION` ("is the first image better than the second ...", diffrl's own wording: RewardDance published
  no prompt or code), normalised over the yes/no tokens exactly as ``vlm_yes_prob``. With ``both_orders=True``
  (default) it asks both orders and returns ``P(a > b) = (p(a, b) + 1 - p(b, a)) / 2``, which cancels a constant
  position bias (a judge that prefers the first image by ``d`` gives ``p(a, b) = q + d`` and ``p(b, a) = 1 - q + d``)
  and makes ``compare(a, b) + compare(b, a) = 1``.
* ``unifiedreward_pairwise`` (:class:`UnifiedRewardPairwiseJudge`): UnifiedReward's pairwise prompt
  (:data:`UNIFIEDREWARD_PAIR_TEMPLATE`, verbatim from ``inference_qwen/image_generation/qwen_pair_rank_image_generation.py``),
  the answer generated and read as the repository's benchmark scripts and Pref-GRPO read it: "Image 1 is better" in
  the answer -> 1, else "Image 2 is better" -> 0, else "Both images are equally good" -> 0.5 (a tie), else unparsed
  -> 0.5 (Pref-GRPO's half a win each; counted in ``stats``, or an error with ``unparsed="raise"``). One order by
  default, as the reference; ``both_orders=True`` averages both as above.

**Win-rate rewards** for the trainers: ``vlm_pairwise_winrate`` and ``unifiedreward_pairwise_winrate``
(:class:`VLMPairwiseWinRate`, :class:`UnifiedRewardPairwiseWinRate`) are :class:`~diffrl.rewards.pairwise.GroupWinRate`
over these judges: each image's win rate within its group of equal prompts, all pairs or a tournament of
``opponents`` per image; ``cache`` (an SQLite path or a :class:`~diffrl.rewards.ScoreCache`) caches every ordered
comparison. They score whole groups, so ``per_sample = False``.

Deviations from the references: images are quantised to 8 bits and sent as PNG (lossless; Pref-GRPO sends JPEG
quality 95, Flow-GRPO resizes to 512x512 first); the local backend's processor resizes them within its own pixel
bounds (the reference's ``qwen_vl_utils.process_vision_info`` applies the same Qwen2.5-VL bounds); generation is
greedy in both backends (``temperature=0`` on the server).
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .base import Reward
from .cache import CachedPairwiseReward, ScoreCache
from .pairwise import GroupWinRate, PairwiseReward
from .vlm import DEFAULT_MODEL, VLMBackend, to_uint8, vlm_hub_files
from .weights import HubFile

__all__ = [
    "UnifiedRewardScore",
    "VLMPairwiseJudge",
    "UnifiedRewardPairwiseJudge",
    "VLMPairwiseWinRate",
    "UnifiedRewardPairwiseWinRate",
    "UNIFIEDREWARD_MODEL",
    "UNIFIEDREWARD_POINT_TEMPLATE",
    "UNIFIEDREWARD_PAIR_TEMPLATE",
    "PAIR_QUESTION",
    "parse_final_score",
    "parse_pair_answer",
]

logger = logging.getLogger(__name__)

UNIFIEDREWARD_MODEL = "CodeGoat24/UnifiedReward-qwen-7b"

#: UnifiedReward's pointwise image-generation prompt, verbatim (``{prompt}`` is replaced by the prompt)
UNIFIEDREWARD_POINT_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this "
    "image based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
    "Extract key elements from the provided text caption, evaluate their presence in the generated image using "
    "the format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and "
    "assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)

#: UnifiedReward's pairwise image-generation prompt, verbatim (image 1, image 2, then this text)
UNIFIEDREWARD_PAIR_TEMPLATE = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate and "
    "compare these images based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well each image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of each image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
    "Compare both images using the above criteria and select the one that better aligns with the caption while "
    "exhibiting superior visual quality.\n"
    'Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." and "Both images are equally '
    'good."\n'
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)

#: diffrl's yes/no question for the RewardDance-style pairwise judge (image 1, image 2, then this text)
PAIR_QUESTION = (
    'Both images were generated for the prompt "{prompt}". Is the first image better than the second one, '
    "considering how faithfully it shows the prompt and its visual quality? Please answer yes or no."
)

_FINAL = "Final Score:"
_PAIR_ANSWERS = (
    ("Image 1 is better", 1.0),
    ("Image 2 is better", 0.0),
    ("Both images are equally good", 0.5),
)


def parse_final_score(text: str) -> tuple[int | None, bool]:
    """``(score, had_marker)`` of a UnifiedReward pointwise answer, read as the reference reads it: the first run of
    digits after the last ``Final Score:`` (in the whole answer when there is no marker), ``None`` when there is
    none."""
    text = text if isinstance(text, str) else ""
    tail = text.split(_FINAL)[-1]
    digits = re.search(r"\d+", tail)
    return (int(digits.group()) if digits else None), _FINAL in text


def parse_pair_answer(text: str) -> float | None:
    """1.0 / 0.0 / 0.5 when a UnifiedReward pairwise answer says image 1 / image 2 is better / both are equally
    good (checked in that order, as substrings), ``None`` when it says none of them."""
    text = text if isinstance(text, str) else ""
    for phrase, value in _PAIR_ANSWERS:
        if phrase in text:
            return value
    return None


def _check_template(template: str, option: str, example: str) -> None:
    if not isinstance(template, str) or "{prompt}" not in template:
        raise ValueError(
            f"{option}={template!r} has no {{prompt}} placeholder; write where the prompt goes, e.g. {example!r}."
        )


def _check_max_new_tokens(max_new_tokens: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r} must be a positive integer (the reference uses 512)."
        )


def _check_choice(value: Any, option: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"{option}={value!r} is not known; use one of {', '.join(repr(c) for c in choices)}."
        )


# ---------------------------------------------------------------------------------------------- pointwise


class UnifiedRewardScore(Reward):
    """UnifiedReward's pointwise 1-5 score of a generated image, divided by ``max_score`` (see the module docstring).

    Args:
        model: hub id or local directory of a transformers VLM (local backend; default
            ``CodeGoat24/UnifiedReward-qwen-7b``), or the served model name (server backend).
        template: the prompt, with ``{prompt}`` where the prompt goes (default: UnifiedReward's, verbatim).
        max_score: the top of the template's scale; the reward is the parsed score divided by it.
        max_new_tokens: most tokens generated per answer (512, as the reference).
        unparsed: ``"zero"`` (an answer without a usable score scores 0, as the reference) or ``"raise"``.
        backend, revision, processor_kwargs, base_url, api_key, timeout, max_concurrency, max_retries: as
            :class:`~diffrl.rewards.vlm.VLMYesProb`.
    """

    name = "unifiedreward"
    differentiable = False

    def __init__(
        self,
        model: str | Path = UNIFIEDREWARD_MODEL,
        template: str = UNIFIEDREWARD_POINT_TEMPLATE,
        max_score: int = 5,
        max_new_tokens: int = 512,
        unparsed: str = "zero",
        backend: str = "local",
        revision: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_concurrency: int = 8,
        max_retries: int = 2,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        _check_template(template, "template", "... Text Caption: [{prompt}]")
        if isinstance(max_score, bool) or not isinstance(max_score, int) or max_score < 1:
            raise ValueError(
                f"max_score={max_score!r} must be a positive integer (5 for UnifiedReward's 1-5 scale)."
            )
        _check_max_new_tokens(max_new_tokens)
        _check_choice(unparsed, "unparsed", ("zero", "raise"))
        self.vlm = VLMBackend(
            self.name,
            model,
            backend,
            revision,
            processor_kwargs,
            base_url,
            api_key,
            timeout,
            max_concurrency,
            max_retries,
        )
        self.template = template
        self.max_score = max_score
        self.max_new_tokens = max_new_tokens
        self.unparsed = unparsed
        self.stats = {"answers": 0, "unparsed": 0, "no_marker": 0, "out_of_range": 0}
        self.last_answers: list[str] = []

    def settings(self) -> dict[str, Any]:
        return {
            **self.vlm.settings(),
            "template": self.template,
            "max_score": self.max_score,
            "max_new_tokens": self.max_new_tokens,
            "unparsed": self.unparsed,
        }

    def weight_modules(self) -> list[torch.nn.Module]:
        return self.vlm.modules()

    @classmethod
    def hub_files(cls, **kwargs) -> list[HubFile]:
        return vlm_hub_files(
            kwargs.get("model", UNIFIEDREWARD_MODEL), kwargs.get("revision"), kwargs.get("backend", "local")
        )

    def _load(self) -> None:
        self.vlm.load(self.device, self.dtype)

    def questions(self, prompts: list[str]) -> list[str]:
        """The text sent with each image."""
        return [self.template.replace("{prompt}", p) for p in prompts]

    def answers(self, images: torch.Tensor, prompts: list[str]) -> list[str]:
        """The VLM's answer for each image (images in [0, 1] on the reward's device)."""
        if not self._loaded:
            self.load(self.device if self.device is not None else images.device)
        requests = [[a] for a in to_uint8(images)]
        return self.vlm.generate(requests, self.questions(prompts), self.max_new_tokens)

    def score_answers(self, answers: list[str]) -> list[float]:
        """The reward of each answer (counted in :attr:`stats`)."""
        scores, bad = [], []
        for text in answers:
            value, marker = parse_final_score(text)
            self.stats["answers"] += 1
            self.stats["no_marker"] += not marker
            if value is None:
                self.stats["unparsed"] += 1
                bad.append(text)
                value = 0
            elif value > self.max_score:
                self.stats["out_of_range"] += 1
                bad.append(text)
                value = 0
            scores.append(value / self.max_score)
        if bad:
            if self.unparsed == "raise":
                raise RuntimeError(
                    f"reward {self.name!r}: {len(bad)} of {len(answers)} answers hold no score from 0 to "
                    f"{self.max_score} after {_FINAL!r} (first: {bad[0][-300:]!r}); check the model and the "
                    "template, raise max_new_tokens, or pass unparsed='zero' to score them 0 as the reference does."
                )
            logger.warning(
                "reward %r: %d of %d answers hold no score from 0 to %d (scored 0; first: %r)",
                self.name,
                len(bad),
                len(answers),
                self.max_score,
                bad[0][-200:],
            )
        return scores

    def score(self, images, prompts, **metadata):
        answers = self.answers(images, prompts)
        self.last_answers = list(answers)
        return torch.tensor(self.score_answers(answers), dtype=torch.float32, device=images.device)


# ---------------------------------------------------------------------------------------------- pairwise


class _VLMJudge(PairwiseReward):
    """What both pairwise VLM judges share: the backend, the template and the order handling."""

    default_model: str = DEFAULT_MODEL

    def _setup(self, template: str, both_orders: bool, vlm_args: tuple) -> None:
        if not isinstance(both_orders, bool):
            raise ValueError(f"both_orders={both_orders!r} must be True or False.")
        self.vlm = VLMBackend(self.name, *vlm_args)
        self.template = template
        self.both_orders = both_orders

    def settings(self) -> dict[str, Any]:
        return {**self.vlm.settings(), "template": self.template, "both_orders": self.both_orders}

    def weight_modules(self) -> list[torch.nn.Module]:
        return self.vlm.modules()

    @classmethod
    def hub_files(cls, **kwargs) -> list[HubFile]:
        return vlm_hub_files(
            kwargs.get("model", cls.default_model), kwargs.get("revision"), kwargs.get("backend", "local")
        )

    def _load(self) -> None:
        self.vlm.load(self.device, self.dtype)

    def questions(self, prompts: list[str]) -> list[str]:
        """The text sent after the two images for each prompt."""
        return [self.template.replace("{prompt}", p) for p in prompts]

    def requests(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]):
        """``(images, texts)`` of the requests of a chunk: every pair as (a, b), then, with ``both_orders``, as
        (b, a)."""
        a, b = to_uint8(images_a), to_uint8(images_b)
        images = [[x, y] for x, y in zip(a, b, strict=True)]
        texts = self.questions(prompts)
        if self.both_orders:
            images += [[y, x] for x, y in zip(a, b, strict=True)]
            texts = texts + texts
        return images, texts

    def combine(self, first: torch.Tensor) -> torch.Tensor:
        """P(a better) from the answers' P(image 1 better): ``(p(a, b) + 1 - p(b, a)) / 2`` with both orders."""
        if not self.both_orders:
            return first
        n = first.shape[0] // 2
        return (first[:n] + 1.0 - first[n:]) / 2


class VLMPairwiseJudge(_VLMJudge):
    """RewardDance-style pairwise judge: P("yes") that the first image is better, both orders averaged (see the
    module docstring).

    Args:
        model: as :class:`~diffrl.rewards.vlm.VLMYesProb` (default ``Qwen/Qwen2.5-VL-7B-Instruct``).
        question: the yes/no question asked after the two images, with ``{prompt}`` (default :data:`PAIR_QUESTION`).
        both_orders: ask both orders and average (``True``) or ask (a, b) only.
        backend, revision, processor_kwargs, base_url, api_key, timeout, max_concurrency, max_retries,
            top_logprobs, missing_answer: as :class:`~diffrl.rewards.vlm.VLMYesProb`.
    """

    name = "vlm_pairwise"

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        question: str = PAIR_QUESTION,
        both_orders: bool = True,
        backend: str = "local",
        revision: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_concurrency: int = 8,
        max_retries: int = 2,
        top_logprobs: int = 20,
        missing_answer: str = "raise",
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        _check_template(question, "question", PAIR_QUESTION)
        _check_choice(missing_answer, "missing_answer", ("raise", "neutral"))
        vlm_args = (model, backend, revision, processor_kwargs, base_url, api_key, timeout)
        self._setup(question, both_orders, vlm_args + (max_concurrency, max_retries, top_logprobs))
        self.missing_answer = missing_answer

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "missing_answer": self.missing_answer}

    def compare_chunk(self, images_a, images_b, prompts, **metadata):
        images, texts = self.requests(images_a, images_b, prompts)
        first = self.vlm.yes_prob(images, texts, self.missing_answer)
        return self.combine(first).to(images_a.device)


class UnifiedRewardPairwiseJudge(_VLMJudge):
    """UnifiedReward's pairwise ranking: the generated conclusion read as 1 / 0 / 0.5 (see the module docstring).

    Args:
        model: as :class:`UnifiedRewardScore` (default ``CodeGoat24/UnifiedReward-qwen-7b``).
        template: the prompt after the two images, with ``{prompt}`` (default: UnifiedReward's, verbatim).
        both_orders: also ask (b, a) and average (default ``False``, one order as the reference).
        max_new_tokens: most tokens generated per answer (512, as the reference).
        unparsed: ``"tie"`` (an answer with no conclusion counts 0.5, as Pref-GRPO) or ``"raise"``.
        backend, revision, processor_kwargs, base_url, api_key, timeout, max_concurrency, max_retries: as
            :class:`~diffrl.rewards.vlm.VLMYesProb`.
    """

    name = "unifiedreward_pairwise"
    default_model = UNIFIEDREWARD_MODEL

    def __init__(
        self,
        model: str | Path = UNIFIEDREWARD_MODEL,
        template: str = UNIFIEDREWARD_PAIR_TEMPLATE,
        both_orders: bool = False,
        max_new_tokens: int = 512,
        unparsed: str = "tie",
        backend: str = "local",
        revision: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_concurrency: int = 8,
        max_retries: int = 2,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        _check_template(template, "template", "... Text Caption: [{prompt}]")
        _check_max_new_tokens(max_new_tokens)
        _check_choice(unparsed, "unparsed", ("tie", "raise"))
        vlm_args = (model, backend, revision, processor_kwargs, base_url, api_key, timeout)
        self._setup(template, both_orders, vlm_args + (max_concurrency, max_retries))
        self.max_new_tokens = max_new_tokens
        self.unparsed = unparsed
        self.stats = {"answers": 0, "unparsed": 0}
        self.last_answers: list[str] = []

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_new_tokens": self.max_new_tokens, "unparsed": self.unparsed}

    def read_answers(self, answers: list[str]) -> torch.Tensor:
        """P(image 1 better) of each answer (counted in :attr:`stats`)."""
        values, bad = [], []
        for text in answers:
            value = parse_pair_answer(text)
            self.stats["answers"] += 1
            if value is None:
                self.stats["unparsed"] += 1
                bad.append(text)
                value = 0.5
            values.append(value)
        if bad:
            if self.unparsed == "raise":
                raise RuntimeError(
                    f"pairwise reward {self.name!r}: {len(bad)} of {len(answers)} answers name no better image "
                    f"(first: {bad[0][-300:]!r}); check the model and the template, raise max_new_tokens, or pass "
                    "unparsed='tie' to count them 0.5 as Pref-GRPO does."
                )
            logger.warning(
                "pairwise reward %r: %d of %d answers name no better image (counted as ties; first: %r)",
                self.name,
                len(bad),
                len(answers),
                bad[0][-200:],
            )
        return torch.tensor(values, dtype=torch.float32)

    def compare_chunk(self, images_a, images_b, prompts, **metadata):
        images, texts = self.requests(images_a, images_b, prompts)
        answers = self.vlm.generate(images, texts, self.max_new_tokens)
        self.last_answers = list(answers)
        return self.combine(self.read_answers(answers)).to(images_a.device)


# ---------------------------------------------------------------------------------------------- win rates

_GROUP_OPTIONS = ("opponents", "seed", "cache", "batch_size", "device", "dtype")


class _JudgeWinRate(GroupWinRate):
    """A :class:`GroupWinRate` over a judge built from the same options (the registry entries)."""

    judge_class: type[_VLMJudge] = VLMPairwiseJudge

    def __init__(
        self,
        opponents: int | None = None,
        seed: int = 0,
        cache: ScoreCache | str | Path | None = None,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
        **judge_options,
    ):
        known = [
            n
            for n in inspect.signature(self.judge_class.__init__).parameters
            if n not in ("self", *_GROUP_OPTIONS)
        ]
        unknown = [k for k in judge_options if k not in known]
        if unknown:
            raise ValueError(
                f"reward {self.name!r} has no option {unknown[0]!r}; its options are "
                f"{', '.join(['opponents', 'seed', 'cache', *known, 'batch_size', 'device', 'dtype'])}."
            )
        judge = self.judge_class(**judge_options, batch_size=batch_size, device=device, dtype=dtype)
        # errors (missing weights: `diffrl download <name>`) name the registered reward, not the judge
        judge.vlm.owner = self.name
        if cache is not None:
            judge = CachedPairwiseReward(judge, cache)
        super().__init__(judge, opponents=opponents, seed=seed, name=self.name, device=device)

    @classmethod
    def hub_files(cls, **kwargs) -> list[HubFile]:
        return cls.judge_class.hub_files(**{k: v for k, v in kwargs.items() if k not in _GROUP_OPTIONS})


class VLMPairwiseWinRate(_JudgeWinRate):
    """``vlm_pairwise_winrate``: win rates within each group under :class:`VLMPairwiseJudge`.

    Args: ``opponents`` (``None``: all pairs), ``seed``, ``cache`` (SQLite path or ScoreCache of the comparisons)
    as :class:`~diffrl.rewards.pairwise.GroupWinRate` / :class:`~diffrl.rewards.cache.CachedPairwiseReward`; every
    other option is :class:`VLMPairwiseJudge`'s (``batch_size``: pairs per forward pass).
    """

    name = "vlm_pairwise_winrate"
    judge_class = VLMPairwiseJudge


class UnifiedRewardPairwiseWinRate(_JudgeWinRate):
    """``unifiedreward_pairwise_winrate``: win rates within each group under :class:`UnifiedRewardPairwiseJudge`
    (Pref-GRPO's reward with ``opponents=None``).

    Args: ``opponents``, ``seed``, ``cache`` as :class:`VLMPairwiseWinRate`; every other option is
    :class:`UnifiedRewardPairwiseJudge`'s.
    """

    name = "unifiedreward_pairwise_winrate"
    judge_class = UnifiedRewardPairwiseJudge
