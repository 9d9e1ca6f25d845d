"""Prefect orchestration of the DVC DAG in dvc.yaml."""
