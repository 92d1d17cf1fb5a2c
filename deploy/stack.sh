#!/usr/bin/env bash
# Local stack of real services: Apache Kafka (KRaft, from Maven Central jars) and redis-server.
#   deploy/stack.sh up | down | status | tools (installs prometheus/promtool for the tests)
#   deploy/stack.sh down-kafka | down-redis: stop one service (the chaos run's faults; `up` restarts it)
#   deploy/stack.sh cluster up | down | status | kill N | start N: a three-node KRaft cluster (each node
#                   broker + controller; replication 3, min.insync.replicas 2) on PQL_CLUSTER_PORT
#                   (19092: below the ephemeral range 32768-60999, so that no client reconnecting to a dead
#                   node can self-connect and hold its port): node N listens on PQL_CLUSTER_PORT + 2(N-1),
#                   its controller on the next port;
#                   `kill N` SIGKILLs node N, `stop N` stops it (SIGTERM), `start N` starts it again
#   deploy/stack.sh up-redis: Redis alone (with a cluster)
# Settings (env): PQL_KAFKA_PORT (9092), PQL_KAFKA_CONTROLLER_PORT (Kafka port + 1),
#                 PQL_REDIS_PORT (6379), PQL_STACK_DIR (.stack), PQL_KAFKA_HEAP (1g),
#                 PQL_KAFKA_SASL_PORT (unset: none): a second listener, SASL_PLAINTEXT with SCRAM-SHA-512
#                 (users are created with the admin API; the tests do)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
kafka_port=${PQL_KAFKA_PORT:-9092}
sasl_port=${PQL_KAFKA_SASL_PORT:-}
controller_port=${PQL_KAFKA_CONTROLLER_PORT:-$((kafka_port + 1))}
redis_port=${PQL_REDIS_PORT:-6379}
dir=${PQL_STACK_DIR:-$root/.stack}
libs=${PQL_KAFKA_LIBS:-$root/.stack/kafka-libs}
heap=${PQL_KAFKA_HEAP:-1g}
pom=$root/deploy/kafka/pom.xml

say() { echo "stack: $*" >&2; }
die() { echo "stack: error: $*" >&2; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # wait_for SECONDS DESCRIPTION PIDFILE LOG COMMAND...
  local secs=$1 what=$2 pidfile=$3 log=$4; shift 4
  local deadline=$((SECONDS + secs))
  until "$@"; do
    alive "$pidfile" || die "$what exited during start-up; read $log"
    [ $SECONDS -lt $deadline ] || die "$what did not answer within ${secs}s; read $log"
    sleep 0.3
  done
}

kafka_jars() {
  local stamp=$libs/.pom.sha256 want
  want=$(sha256sum "$pom" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka jars from Maven Central"
  say "fetching Kafka jars with Maven into $libs (once)"
  rm -rf "$libs"; mkdir -p "$libs"
  mvn -B -q -f "$pom" org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs" >"$dir/maven.log" 2>&1 \
    || die "Maven could not fetch the Kafka jars; read $dir/maven.log"
  echo "$want" >"$stamp"
}

kafka_ready() {
  port_open "$kafka_port" && grep -q "Kafka Server started" "$dir/kafka/logs/kafka.log" 2>/dev/null
}

kafka_up() {
  local k=$dir/kafka pidfile=$dir/kafka/kafka.pid
  if alive "$pidfile"; then say "kafka already running on 127.0.0.1:$kafka_port (pid $(cat "$pidfile"))"; return; fi
  command -v java >/dev/null || die "Java 17+ is needed for Kafka (apt-get install openjdk-17-jre-headless)"
  for p in "$kafka_port" "$controller_port"; do
    port_open "$p" && die "port $p is taken by another process; set PQL_KAFKA_PORT / PQL_KAFKA_CONTROLLER_PORT"
  done
  kafka_jars
  mkdir -p "$k/logs" "$k/data"
  sed -e "s|@PORT@|$kafka_port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" -e "s|@DATA@|$k/data|g" \
    "$root/deploy/kafka/server.properties.in" >"$k/server.properties"
  if [ -n "$sasl_port" ]; then
    port_open "$sasl_port" && die "port $sasl_port is taken by another process; set PQL_KAFKA_SASL_PORT"
    sed -i -e "s|^listeners=.*|&,SASL_PLAINTEXT://127.0.0.1:$sasl_port|" \
      -e "s|^advertised.listeners=.*|&,SASL_PLAINTEXT://127.0.0.1:$sasl_port|" \
      -e "s|^listener.security.protocol.map=.*|&,SASL_PLAINTEXT:SASL_PLAINTEXT|" "$k/server.properties"
    printf '%s\n' "sasl.enabled.mechanisms=SCRAM-SHA-512" \
      "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;" \
      >>"$k/server.properties"
  fi
  local log4j="-Dlog4j2.configurationFile=$root/deploy/kafka/log4j2.properties -Dkafka.logs.dir=$k/logs"
  if [ ! -f "$k/data/meta.properties" ]; then
    local cid
    cid=$(java -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)
    java -Xmx256m $log4j -cp "$libs/*" kafka.tools.StorageTool format --ignore-formatted \
      -t "$cid" -c "$k/server.properties" >"$k/logs/format.log" 2>&1 \
      || die "formatting Kafka storage failed; read $k/logs/format.log"
  fi
  : >"$k/logs/kafka.log"
  nohup java -Xms256m -Xmx"$heap" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -Djava.awt.headless=true $log4j \
    -cp "$libs/*" kafka.Kafka "$k/server.properties" >"$k/logs/stdout.log" 2>&1 &
  echo $! >"$pidfile"
  wait_for 90 "kafka" "$pidfile" "$k/logs/kafka.log" kafka_ready
  say "kafka up on 127.0.0.1:$kafka_port (pid $(cat "$pidfile"), logs $k/logs)"
}

redis_bin() {
  command -v redis-server >/dev/null && return
  say "installing redis-server with apt-get (once)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; } \
    >"$dir/apt.log" 2>&1 || die "could not install redis-server; read $dir/apt.log"
}

redis_up() {
  local r=$dir/redis pidfile=$dir/redis/redis.pid
  if alive "$pidfile"; then say "redis already running on 127.0.0.1:$redis_port (pid $(cat "$pidfile"))"; return; fi
  port_open "$redis_port" && die "port $redis_port is taken by another process; set PQL_REDIS_PORT"
  redis_bin
  mkdir -p "$r"
  nohup redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$r" --save "" --appendonly no \
    --daemonize no --logfile "$r/redis.log" >/dev/null 2>&1 &
  echo $! >"$pidfile"
  wait_for 20 "redis" "$pidfile" "$r/redis.log" \
    bash -c "[ \"\$(redis-cli -p $redis_port ping 2>/dev/null)\" = PONG ]"
  say "redis up on 127.0.0.1:$redis_port (pid $(cat "$pidfile"), log $r/redis.log)"
}

stop() { # stop NAME PIDFILE
  local name=$1 pidfile=$2 pid
  if ! alive "$pidfile"; then rm -f "$pidfile"; return; fi
  pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && { say "$name (pid $pid) did not stop in 20s; killing"; kill -9 "$pid"; }
  rm -f "$pidfile"
  say "$name stopped"
}

prometheus_bin() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return
  say "installing prometheus (and promtool) with apt-get (once)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } \
    >"$dir/apt-prometheus.log" 2>&1 || die "could not install prometheus; read $dir/apt-prometheus.log"
}

chromium_bin() {
  command -v chromium >/dev/null && return
  say "installing chromium with apt-get (once; the backtest report's browser test)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; } \
    >"$dir/apt-chromium.log" 2>&1 || die "could not install chromium; read $dir/apt-chromium.log"
}

cluster_port=${PQL_CLUSTER_PORT:-19092}
cdir=$dir/cluster

node_port() { echo $((cluster_port + 2 * ($1 - 1))); }

cluster_node_up() { # cluster_node_up N
  local n=$1 k=$cdir/node$1 pidfile=$cdir/node$1/kafka.pid port cport voters=""
  port=$(node_port "$n"); cport=$((port + 1))
  if alive "$pidfile"; then say "cluster node $n already running (pid $(cat "$pidfile"))"; return; fi
  for i in 1 2 3; do voters+="${voters:+,}$i@127.0.0.1:$(( $(node_port $i) + 1 ))"; done
  mkdir -p "$k/logs" "$k/data"
  sed -e "s|@NODE@|$n|g" -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@VOTERS@|$voters|g" \
    -e "s|@DATA@|$k/data|g" "$root/deploy/kafka/cluster.properties.in" >"$k/server.properties"
  local log4j="-Dlog4j2.configurationFile=$root/deploy/kafka/log4j2.properties -Dkafka.logs.dir=$k/logs"
  if [ ! -f "$k/data/meta.properties" ]; then
    java -Xmx256m $log4j -cp "$libs/*" kafka.tools.StorageTool format --ignore-formatted \
      -t "$(cat "$cdir/cluster.id")" -c "$k/server.properties" >"$k/logs/format.log" 2>&1 \
      || die "formatting cluster node $n failed; read $k/logs/format.log"
  fi
  : >"$k/logs/kafka.log"
  nohup java -Xms128m -Xmx"${PQL_KAFKA_HEAP:-512m}" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true $log4j -cp "$libs/*" kafka.Kafka "$k/server.properties" >"$k/logs/stdout.log" 2>&1 &
  echo $! >"$pidfile"
}

cluster_wait() { # cluster_wait N
  local k=$cdir/node$1
  wait_for 120 "cluster node $1" "$k/kafka.pid" "$k/logs/kafka.log" \
    bash -c "(exec 3<>/dev/tcp/127.0.0.1/$(node_port "$1")) 2>/dev/null && grep -q 'Kafka Server started' '$k/logs/kafka.log'"
}

cluster() {
  case "${1:-up}" in
    up)
      command -v java >/dev/null || die "Java 17+ is needed for Kafka"
      kafka_jars
      mkdir -p "$cdir"
      [ -f "$cdir/cluster.id" ] || java -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 >"$cdir/cluster.id"
      for n in 1 2 3; do cluster_node_up "$n"; done
      for n in 1 2 3; do cluster_wait "$n"; done
      say "kafka cluster up: 127.0.0.1:$(node_port 1),127.0.0.1:$(node_port 2),127.0.0.1:$(node_port 3)" ;;
    down) for n in 1 2 3; do stop "cluster node $n" "$cdir/node$n/kafka.pid"; done ;;
    kill)
      [ -n "${2:-}" ] || die "usage: deploy/stack.sh cluster kill N"
      if alive "$cdir/node$2/kafka.pid"; then kill -9 "$(cat "$cdir/node$2/kafka.pid")"; fi
      rm -f "$cdir/node$2/kafka.pid"; say "cluster node $2 killed" ;;
    stop)
      [ -n "${2:-}" ] || die "usage: deploy/stack.sh cluster stop N"
      stop "cluster node $2" "$cdir/node$2/kafka.pid" ;;
    start)
      [ -n "${2:-}" ] || die "usage: deploy/stack.sh cluster start N"
      cluster_node_up "$2"; cluster_wait "$2"; say "cluster node $2 up on 127.0.0.1:$(node_port "$2")" ;;
    status)
      for n in 1 2 3; do
        alive "$cdir/node$n/kafka.pid" && echo "node $n: running on 127.0.0.1:$(node_port "$n")" || echo "node $n: stopped"
      done ;;
    *) die "usage: deploy/stack.sh cluster up|down|status|kill N|stop N|start N" ;;
  esac
}

mkdir -p "$dir"
case "${1:-up}" in
  cluster) shift; cluster "$@" ;;
  tools) prometheus_bin ;;
  browser) chromium_bin ;;
  up) redis_up; kafka_up ;;
  up-redis) redis_up ;;
  down) stop kafka "$dir/kafka/kafka.pid"; stop redis "$dir/redis/redis.pid" ;;
  down-kafka) stop kafka "$dir/kafka/kafka.pid" ;;
  down-redis) stop redis "$dir/redis/redis.pid" ;;
  status)
    alive "$dir/kafka/kafka.pid" && echo "kafka: running on 127.0.0.1:$kafka_port" || echo "kafka: stopped"
    alive "$dir/redis/redis.pid" && echo "redis: running on 127.0.0.1:$redis_port" || echo "redis: stopped" ;;
  *) die "usage: deploy/stack.sh up|down|down-kafka|down-redis|status|tools|browser|cluster ..." ;;
esac
