"""Leaks planted secrets on purpose. Not part of the suite (its name does not start with
`test_`): tests/test_secret_scan.py runs it in a pytest of its own to show that the
after-test scan in tests/conftest.py fails a test that leaks."""

from __future__ import annotations

import os

from helpers import launch


def test_leaks_a_planted_value_into_a_run_log(ferry_home):
    log = ferry_home / "runs" / "leaky" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text(f"step 1 | token {os.environ['HF_TOKEN']}\n")


def test_leaks_a_planted_value_into_captured_output():
    launch("status", os.environ["WANDB_API_KEY"])  # the error echoes the run id it was given


def test_leaks_nothing():
    launch("runs", check=True)


def test_leaks_a_planted_value_into_storage(s3_bucket):
    import boto3

    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="runs/r/config.yml", Body=os.environ["AWS_SECRET_ACCESS_KEY"]
    )
