"""The TOFU evaluation sets, described once as data.

Every place that needs to know which sets exist, which columns they read, which answer is the "correct" one
of the truth ratio, how a set aggregates, or what other tools call its scores reads :data:`EVAL_SETS`:
the evaluation data (:mod:`perta_lightning.benchmarks.tofu.evaluation`), the evaluator (:mod:`perta_lightning.benchmarks.tofu.evaluator`)
and the reader of evaluation files (:mod:`perta_lightning.benchmarks.tofu.summary`).

Per set, over its examples ``i`` (``nll`` is the mean answer-token NLL, EOS included):

* probability: ``mean exp(-nll(answer_i))``, or normalised over the options,
  ``mean p(answer_i) / (p(answer_i) + sum_j p(perturbed_ij))`` (``normalised_probability``);
* truth ratio ``R_i = exp(mean_j nll(perturbed_ij) - nll(correct_i))`` with ``correct`` the column
  ``truth_ratio_correct``; aggregated as ``mean min(R, 1/R)`` (``truth_ratio_closer_to_one``, the forget set:
  a forgotten answer is no likelier than a wrong one) or else ``mean max(0, 1 - 1/R)``;
* ROUGE-L recall of the greedy generation against ``answer``;
* extraction strength and the Min-K% MIA score where the set says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSetSpec:
    """One TOFU evaluation set.

    Attributes:
        name: the set's name, the prefix of its scores (``forget_probability``) and the data module's option
            ``<name>_split``.
        default_split: the TOFU split it reads by default.
        has_paraphrase: rows have ``paraphrased_answer`` (scored, and used by the truth ratio).
        scored: the set has probability, truth ratio and ROUGE (every set but the MIA holdout).
        normalised_probability: probability normalised over the answer and its perturbed options.
        truth_ratio_correct: the column whose answer is the numerator's "correct" answer of the truth ratio.
        truth_ratio_closer_to_one: aggregate ``min(R, 1/R)`` (forget) instead of ``max(0, 1 - 1/R)``.
        extraction_strength: report the mean extraction strength.
        min_k: score Min-K% for the MIA (forget against holdout).
        in_model_utility: its three scores enter the Model Utility harmonic mean.
        tofu_log_key: the key of this set in TOFU's ``eval_log_aggregated.json``.
        open_unlearning_keys: the keys of its probability, ROUGE and truth ratio in open-unlearning's
            ``TOFU_EVAL.json``.
    """

    name: str
    default_split: str
    has_paraphrase: bool = False
    scored: bool = True
    normalised_probability: bool = False
    truth_ratio_correct: str = "answer"
    truth_ratio_closer_to_one: bool = False
    extraction_strength: bool = False
    min_k: bool = False
    in_model_utility: bool = False
    tofu_log_key: str | None = None
    open_unlearning_keys: tuple[str, str, str] | None = None

    @property
    def required_columns(self) -> tuple[str, ...]:
        """The columns every row of the split must have."""
        columns = ("question", "answer")
        if self.has_paraphrase:
            columns += ("paraphrased_answer",)
        if self.scored:
            columns += ("perturbed_answer",)
        return columns

    @property
    def score_keys(self) -> tuple[str, ...]:
        """``<name>_probability``, ``<name>_rouge``, ``<name>_truth_ratio`` (empty for an unscored set)."""
        return tuple(f"{self.name}_{metric}" for metric in SUB_METRICS) if self.scored else ()


SUB_METRICS = ("probability", "rouge", "truth_ratio")

EVAL_SETS: tuple[EvalSetSpec, ...] = (
    EvalSetSpec("forget", "forget10_perturbed", has_paraphrase=True, truth_ratio_correct="paraphrased_answer",
                truth_ratio_closer_to_one=True, extraction_strength=True, min_k=True,
                tofu_log_key="eval_log_forget.json",
                open_unlearning_keys=("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio")),
    EvalSetSpec("retain", "retain_perturbed", has_paraphrase=True, truth_ratio_correct="paraphrased_answer",
                extraction_strength=True, in_model_utility=True, tofu_log_key="eval_log.json",
                open_unlearning_keys=("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio")),
    EvalSetSpec("real_authors", "real_authors_perturbed", normalised_probability=True, in_model_utility=True,
                tofu_log_key="eval_real_author_wo_options.json",
                open_unlearning_keys=("ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio")),
    EvalSetSpec("world_facts", "world_facts_perturbed", normalised_probability=True, in_model_utility=True,
                tofu_log_key="eval_real_world_wo_options.json",
                open_unlearning_keys=("wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")),
    EvalSetSpec("holdout", "holdout10", scored=False, min_k=True),
)

#: The sets by name, in dataloader order.
EVAL_SET_BY_NAME: dict[str, EvalSetSpec] = {spec.name: spec for spec in EVAL_SETS}

#: The nine sub-scores whose harmonic mean is Model Utility.
UTILITY_KEYS: tuple[str, ...] = tuple(key for spec in EVAL_SETS if spec.in_model_utility for key in spec.score_keys)

#: The twelve sub-scores of the scored sets.
SCORE_KEYS: tuple[str, ...] = tuple(key for spec in EVAL_SETS for key in spec.score_keys)
