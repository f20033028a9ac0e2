#!/bin/sh
# Stand-in for Bazel's coverage tools: coverage is not collected in this project.
echo "coverage is not supported in this workspace (offline stand-in for remote_coverage_tools)" >&2
exit 0
