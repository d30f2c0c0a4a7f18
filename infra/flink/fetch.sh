#!/usr/bin/env bash
# What a local Flink cluster for the Beam jobs needs, fetched with pip and mvn only and
# checked by sha256, into $MIMDEX_TOOLS (default .tools/); a second run finds it there.
#   flink-1.19.0/                  Flink's lib/ (flink-dist ...) and bin/bash-java-utils.jar
#   beam-flink-job-server-2.62.0/  Beam's Flink job server: lib/ (its class path) and a
#                                  launcher jar whose manifest names them, for
#                                  --flink_job_server_jar
#   loopback_bind.so               a bind(2) shim, see loopback_bind.c
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools=${MIMDEX_TOOLS:-$(cd "$here/../.." && pwd)/.tools}
FLINK=1.19.0
BEAM=2.62.0
dist=$tools/flink-$FLINK
js=$tools/beam-flink-job-server-$BEAM
mkdir -p "$tools"
scratch=$(mktemp -d "$tools/.fetch-XXXXXX")
trap 'rm -rf "$scratch"' EXIT

if [ ! -f "$dist/.verified" ]; then
  python3 -m pip download --quiet --no-deps --require-hashes -r "$here/flink-libraries.txt" -d "$scratch/pypi"
  mkdir -p "$scratch/flink"
  tar xzf "$scratch/pypi/apache-flink-libraries-$FLINK.tar.gz" -C "$scratch/flink" --strip-components=2 \
    "apache-flink-libraries-$FLINK/deps/lib" "apache-flink-libraries-$FLINK/deps/bin/bash-java-utils.jar"
  touch "$scratch/flink/.verified"
  rm -rf "$dist" && mv "$scratch/flink" "$dist"
fi

if [ ! -f "$js/.verified" ]; then
  # -C: Maven fails on a checksum that does not match the repository's; then our own list
  mvn -q -B -C -f "$here/job-server.pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$scratch/js/lib" -DincludeScope=runtime
  (cd "$scratch/js/lib" && sha256sum --quiet --strict -c "$here/job-server.sha256")
  extra=$(comm -13 <(awk '{print $2}' "$here/job-server.sha256" | sort) <(ls "$scratch/js/lib" | sort))
  [ -z "$extra" ] || { echo "fetch.sh: jars not in job-server.sha256: $extra" >&2; exit 1; }
  # A manifest's lines are at most 72 bytes: one class-path entry per continuation line
  { echo "Manifest-Version: 1.0"
    echo "Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver"
    ls "$scratch/js/lib" | sort | sed 's|^|  lib/|; 1s|^  |Class-Path: |'
  } > "$scratch/MANIFEST.MF"
  jar --create --file "$scratch/js/beam-runners-flink-1.19-job-server-$BEAM.jar" --manifest "$scratch/MANIFEST.MF"
  touch "$scratch/js/.verified"
  rm -rf "$js" && mv "$scratch/js" "$js"
fi

if [ ! -f "$tools/loopback_bind.so" ] || [ "$here/loopback_bind.c" -nt "$tools/loopback_bind.so" ]; then
  gcc -shared -fPIC -O2 -Wall -o "$scratch/loopback_bind.so" "$here/loopback_bind.c" -ldl
  mv "$scratch/loopback_bind.so" "$tools/loopback_bind.so"
fi
echo "flink $FLINK, beam job server $BEAM: $tools"
