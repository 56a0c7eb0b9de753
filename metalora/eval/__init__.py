"""Evaluation: classification metrics, few-shot multiple choice by log-likelihood, generation + exact match."""

from metalora.eval.extract import EXTRACTORS, exact_match, get_extractor, normalize_answer
from metalora.eval.generation import GenItem, GenPrediction, GenResult, evaluate_generation, generate
from metalora.eval.metrics import accuracy, auc_roc, f1, matthews_corrcoef, pearson
from metalora.eval.multiple_choice import (
    FewShotItem,
    ForwardContext,
    MCItem,
    MCPrediction,
    MCResult,
    build_context,
    encode_pair,
    evaluate_multiple_choice,
    loglikelihoods,
    select_shots,
)

__all__ = [
    "EXTRACTORS",
    "FewShotItem",
    "ForwardContext",
    "GenItem",
    "GenPrediction",
    "GenResult",
    "MCItem",
    "MCPrediction",
    "MCResult",
    "accuracy",
    "auc_roc",
    "build_context",
    "encode_pair",
    "evaluate_generation",
    "evaluate_multiple_choice",
    "exact_match",
    "f1",
    "generate",
    "get_extractor",
    "loglikelihoods",
    "matthews_corrcoef",
    "normalize_answer",
    "pearson",
    "select_shots",
]
