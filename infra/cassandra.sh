#!/usr/bin/env bash
# Fetches Apache Cassandra (org.apache.cassandra:cassandra-all and its runtime jars) from
# Maven Central into $PARLEY_HOME/cassandra/lib (default <repo>/.parley, ignored by git) and
# installs the node launcher as $PARLEY_HOME/bin/cassandra-node. The conformance suite and
# the fault tests start a single-node CQL server through it (parley-localstack's
# CassandraNode): Cassandra speaks the same CQL protocol as ScyllaDB, which has no package
# on the project's machines.
#
# Idempotent: a warm run only compares a stamp file (well under a second). Needs Java 17
# (Cassandra 4.1 does not run on it; 5.0 does) and Maven. Without Java it says so and exits
# 0, unless CI or PARLEY_REQUIRE_CQL is set: then the CQL tests must run, so it fails.
set -euo pipefail

CASSANDRA_VERSION="5.0.6"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PARLEY_HOME="${PARLEY_HOME:-$REPO/.parley}"
mkdir -p "$PARLEY_HOME/bin"
PARLEY_HOME="$(cd "$PARLEY_HOME" && pwd)"
CACHE="$PARLEY_HOME/cassandra"
LIB="$CACHE/lib"
STAMP="$CACHE/installed-version"

log() { printf 'cassandra.sh: %s\n' "$*" >&2; }
required() { [ -n "${CI:-}" ] || [ -n "${PARLEY_REQUIRE_CQL:-}" ]; }
missing() {
    if required; then
        log "error: $*; CI runs the CQL conformance suite and must not skip it"
        exit 1
    fi
    log "skipped: $*; the CQL store's tests will be skipped on this machine"
    exit 0
}

command -v java >/dev/null 2>&1 || missing "no java on PATH (Cassandra $CASSANDRA_VERSION needs Java 17)"
java_major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
[ "${java_major%%.*}" -ge 17 ] 2>/dev/null || missing "java is version $java_major; Cassandra $CASSANDRA_VERSION needs 17"

install -m 0755 "$REPO/infra/cassandra-node.sh" "$PARLEY_HOME/bin/cassandra-node"

if [ "$(cat "$STAMP" 2>/dev/null)" = "$CASSANDRA_VERSION" ] && [ -f "$LIB/cassandra-all-$CASSANDRA_VERSION.jar" ]; then
    exit 0
fi

command -v mvn >/dev/null 2>&1 || missing "no mvn on PATH (it fetches cassandra-all from Maven Central)"
log "fetching cassandra-all $CASSANDRA_VERSION and its runtime dependencies with Maven"
mkdir -p "$CACHE"
cat >"$CACHE/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>parley</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$CASSANDRA_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
rm -rf "$LIB.partial"
mvn -B -q -f "$CACHE/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIB.partial"
rm -rf "$LIB"
mv "$LIB.partial" "$LIB"
# The Maven repository is only a download cache; the jars in lib/ are what runs.
rm -rf "$CACHE/m2"
echo "$CASSANDRA_VERSION" >"$STAMP"
log "installed Cassandra $CASSANDRA_VERSION ($(find "$LIB" -name '*.jar' | wc -l) jars) in $LIB"
