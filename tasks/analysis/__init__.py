"""Analyses of models beyond pass@k: choosing T_eval on the validation set (selection), the
lock/fork diagnostics (diagnostics) and the report's figures (plots)."""
