"""Evaluation: metrics on 8-bit images, code usage and rate, figures, reports, comparisons (lasers-eval,
lasers-compare). See DESIGN.md for the metrics.json keys and the folder layout."""

from lasers_dist.eval.compare import bd_psnr, bd_rate, compare
from lasers_dist.eval.evaluate import METRIC_KEYS, EvalOptions, EvalResult, evaluate
from lasers_dist.eval.rate import CoefficientQuantizer, RateSpec
from lasers_dist.eval.report import write_report
from lasers_dist.eval.source import load_model

__all__ = ["METRIC_KEYS", "CoefficientQuantizer", "EvalOptions", "EvalResult", "RateSpec", "bd_psnr", "bd_rate",
           "compare", "evaluate", "load_model", "write_report"]
