"""Evaluation pieces that need no model: the calculator tool, the sandboxed code runner, scoring."""
from .calculator import calculate
from .humaneval_exec import ExecResult, check_humaneval, run_program
from .scoring import BASELINES, categorical_pick, centered, chatcore, extract_answer, gsm8k_correct

__all__ = ["calculate", "run_program", "check_humaneval", "ExecResult", "BASELINES", "categorical_pick",
           "centered", "chatcore", "extract_answer", "gsm8k_correct"]
