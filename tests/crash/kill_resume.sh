#!/usr/bin/env bash
# SIGKILL a training run at 10 random moments, resuming each time; the final weights must equal
# those of an uninterrupted run. Usage: tests/crash/kill_resume.sh [--kills N] [--iters N] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" tests/crash/kill_resume.py "$@"
