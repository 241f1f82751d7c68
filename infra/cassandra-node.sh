#!/usr/bin/env bash
# Runs one single-node Apache Cassandra for tests; installed by infra/cassandra.sh as
# $PARLEY_HOME/bin/cassandra-node, next to the jars in $PARLEY_HOME/cassandra/lib.
#
#   cassandra-node --version
#   cassandra-node run DIR NATIVE_PORT STORAGE_PORT OWNER_PID
#
# `run` writes a loopback-only configuration into DIR (plus DIR/conf/cassandra-extra.yaml,
# when the caller wrote one), starts the JVM (1 GiB heap) in the
# background and watches OWNER_PID, the test process: when the owner is gone without having
# stopped the node (a test binary's process-wide node is never dropped; a test killed by
# SIGKILL runs no destructor), it kills the JVM and deletes DIR, so no java process or data
# directory outlives the tests. The JVM's pid is written to DIR/java.pid (the fault test
# SIGKILLs it). Nothing listens beyond 127.0.0.1: no JMX port, no remote JMX, no Thrift,
# gossip only with itself; Cassandra has no telemetry to turn off.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
LIB="$HERE/../cassandra/lib"
STAMP="$HERE/../cassandra/installed-version"

if [ "${1:-}" = "--version" ]; then
    echo "cassandra-node $(cat "$STAMP")"
    exit 0
fi
[ "${1:-}" = "run" ] && [ $# -eq 5 ] || {
    echo "usage: cassandra-node run DIR NATIVE_PORT STORAGE_PORT OWNER_PID" >&2
    exit 2
}
DIR="$2" NATIVE="$3" STORAGE="$4" OWNER="$5"
mkdir -p "$DIR/conf" "$DIR/logs"

cat >"$DIR/conf/cassandra.yaml" <<YAML
cluster_name: parley-test
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$STORAGE"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $STORAGE
native_transport_port: $NATIVE
start_native_transport: true
auto_bootstrap: false
data_file_directories:
  - $DIR/data
commitlog_directory: $DIR/commitlog
saved_caches_directory: $DIR/saved_caches
hints_directory: $DIR/hints
cdc_raw_directory: $DIR/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
hinted_handoff_enabled: false
auto_snapshot: false
diagnostic_events_enabled: false
YAML
# Settings the caller adds (client-to-node TLS for the TLS tests).
if [ -f "$DIR/conf/cassandra-extra.yaml" ]; then
    cat "$DIR/conf/cassandra-extra.yaml" >>"$DIR/conf/cassandra.yaml"
fi

cat >"$DIR/conf/logback.xml" <<'XML'
<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
</configuration>
XML

jamm="$(ls "$LIB"/jamm-*.jar | head -n1)"
# The module flags are those of Cassandra 5.0's conf/jvm17-server.options.
java \
    -Xms1G -Xmx1G -Xss512k -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError \
    -XX:+UseTLAB -XX:+ResizeTLAB -XX:+PerfDisableSharedMem \
    -Djava.net.preferIPv4Stack=true \
    -Djdk.attach.allowAttachSelf=true \
    -javaagent:"$jamm" \
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED \
    --add-exports java.base/jdk.internal.ref=ALL-UNNAMED \
    --add-exports java.base/sun.nio.ch=ALL-UNNAMED \
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED \
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED \
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED \
    --add-exports java.sql/java.sql=ALL-UNNAMED \
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED \
    --add-exports jdk.compiler/com.sun.tools.javac.model=ALL-UNNAMED \
    --add-opens java.base/java.lang.module=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED \
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED \
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED \
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED \
    --add-opens java.base/java.io=ALL-UNNAMED \
    --add-opens java.base/java.nio=ALL-UNNAMED \
    --add-opens java.base/java.util.concurrent=ALL-UNNAMED \
    --add-opens java.base/java.util=ALL-UNNAMED \
    --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED \
    --add-opens java.base/java.lang=ALL-UNNAMED \
    --add-opens java.base/java.math=ALL-UNNAMED \
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED \
    --add-opens java.base/java.net=ALL-UNNAMED \
    -Dcassandra.config="file://$DIR/conf/cassandra.yaml" \
    -Dlogback.configurationFile="file://$DIR/conf/logback.xml" \
    -Dcassandra.logdir="$DIR/logs" \
    -Dcassandra.storagedir="$DIR" \
    -Dcassandra-foreground=yes \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Dcassandra.load_ring_state=false \
    -cp "$DIR/conf:$LIB/*" \
    org.apache.cassandra.service.CassandraDaemon &
java_pid=$!
echo "$java_pid" >"$DIR/java.pid"
trap 'kill -9 "$java_pid" 2>/dev/null; exit 143' TERM INT

while kill -0 "$OWNER" 2>/dev/null; do
    if ! kill -0 "$java_pid" 2>/dev/null; then
        # The JVM ended (or was killed by a test); its directory stays for a restart.
        wait "$java_pid" || exit $?
        exit 0
    fi
    sleep 0.5
done
kill -9 "$java_pid" 2>/dev/null || true
wait "$java_pid" 2>/dev/null || true
rm -rf "$DIR"
