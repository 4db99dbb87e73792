#!/usr/bin/env bash
# Start the brokers the tests and the quickstart need, if they are not already running.
# Never restarts or reconfigures a broker that is up. See ../shared/SERVICES.md and the README.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if up 5672; then
  echo "services: RabbitMQ is up on 127.0.0.1:5672"
elif command -v rabbitmq-server >/dev/null 2>&1; then
  echo "services: RabbitMQ is not running; starting it (rabbitmq-server -detached)"
  export ERL_EPMD_ADDRESS=127.0.0.1
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do
    if rabbitmqctl await_startup >/dev/null 2>&1 && up 5672; then break; fi
    sleep 1
  done
  up 5672 || { echo "services: RabbitMQ did not come up within 60 s" >&2; exit 1; }
  echo "services: RabbitMQ started"
else
  echo "services: RabbitMQ is not installed. As root: make install-brokers (apt-get install rabbitmq-server mosquitto)" >&2
  exit 1
fi

if up 1883; then
  echo "services: Mosquitto is up on 127.0.0.1:1883"
elif command -v mosquitto >/dev/null 2>&1; then
  echo "services: Mosquitto is not running; starting it"
  if [ -r /etc/mosquitto/mosquitto.conf ]; then
    mosquitto -d -c /etc/mosquitto/mosquitto.conf
  else
    conf=$(mktemp); printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' >"$conf"; mosquitto -d -c "$conf"
  fi
  for _ in $(seq 1 50); do up 1883 && break; sleep 0.1; done
  up 1883 || { echo "services: Mosquitto did not come up" >&2; exit 1; }
  echo "services: Mosquitto started"
else
  echo "services: Mosquitto is not installed. As root: make install-brokers (apt-get install rabbitmq-server mosquitto)" >&2
  exit 1
fi

# Redis: the enrichment tests look customers up in it (their outage tests start a redis-server of their own).
if up 6379; then
  echo "services: Redis is up on 127.0.0.1:6379"
elif command -v redis-server >/dev/null 2>&1; then
  echo "services: Redis is not running; starting it (redis-server --daemonize yes --bind 127.0.0.1)"
  redis-server --daemonize yes --bind 127.0.0.1
  for _ in $(seq 1 50); do up 6379 && break; sleep 0.1; done
  up 6379 || { echo "services: Redis did not come up" >&2; exit 1; }
  echo "services: Redis started"
else
  echo "services: Redis is not installed. As root: make install-brokers (apt-get install redis-server)" >&2
  exit 1
fi

# PostgreSQL: the event store's and the schema registry's shared backend (tests create a database of their own).
if up 5432; then
  echo "services: PostgreSQL is up on 127.0.0.1:5432"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  echo "services: PostgreSQL is not running; starting it (pg_ctlcluster $version main start)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 100); do up 5432 && break; sleep 0.1; done
  up 5432 || { echo "services: PostgreSQL did not come up" >&2; exit 1; }
  echo "services: PostgreSQL started"
else
  echo "services: PostgreSQL is not installed. As root: make install-brokers (apt-get install postgresql)" >&2
  exit 1
fi

# NATS with JetStream: the nats adapter's tests.
if up 4222; then
  echo "services: NATS is up on 127.0.0.1:4222"
elif command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
  server=$(command -v nats-server || echo /usr/sbin/nats-server)
  echo "services: NATS is not running; starting it ($server -a 127.0.0.1 -p 4222 -js)"
  store=${NATS_STORE_DIR:-/var/lib/nats-server}
  mkdir -p "$store" 2>/dev/null || store=$(mktemp -d)
  nohup "$server" -a 127.0.0.1 -p 4222 -js -sd "$store" >/tmp/mediator-nats-server.log 2>&1 &
  for _ in $(seq 1 100); do up 4222 && break; sleep 0.1; done
  up 4222 || { echo "services: NATS did not come up (log: /tmp/mediator-nats-server.log)" >&2; exit 1; }
  echo "services: NATS started"
else
  echo "services: NATS is not installed. As root: make install-brokers (apt-get install nats-server)" >&2
  exit 1
fi

# The clients the README's quickstart (and tests/firsthour/test_readme_docs.py, which runs it) and the
# request-reply tests call: a missing one fails here with what to install, not as a test's exit status 127.
for tool in curl amqp-consume amqp-publish mosquitto_sub mosquitto_pub mosquitto_rr; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "services: $tool is not installed. As root: make install-brokers (apt-get install curl amqp-tools mosquitto-clients)" >&2
    exit 1
  fi
done

# Chromium: tests/dashboard drive Debian's browser through Playwright (Playwright's own build cannot be downloaded here).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "services: Chromium is missing (tests/dashboard need it); installing it: apt-get install -y chromium"
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/tmp/mediator-chromium-install.log 2>&1 \
      || { echo "services: apt-get install chromium failed (log: /tmp/mediator-chromium-install.log)" >&2; exit 1; }
    echo "services: Chromium installed"
  else
    echo "services: Chromium is not installed. As root: make install-brokers (apt-get install chromium)" >&2
    exit 1
  fi
fi
