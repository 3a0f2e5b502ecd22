#!/bin/sh
# Benchmark process program: read the whole message, keep nothing.
cat >/dev/null
