#!/bin/sh
# Set up the compose federation of compose.yaml: the same steps `dicombridge sandbox up`
# takes on loopback (src/dicombridge/sandbox.py, create_federation) and an operator and
# hospitals take by hand (docs/operator-guide.md), with the dicombridge CLI:
#
#   operator init             the federation operator's signing key
#   init, keys export         each site's keys; its public part handed to the operator
#   directory add-site, sign  the signed federation directory
#   broker provision          vhost, exchanges, queues, one user per site
#
# then installs into each site's volumes (deploy/compose/run/SITE/{config,keys,data}):
# gateway.toml (from deploy/compose/SITE/, with the operator's key), directory.json, the
# keys and the site's broker password, owned by the image's user (10001).
#
# Run it from anywhere, as root (or with sudo: the files go to uid 10001), with the
# `dicombridge` command installed (`pip install .`). Safe to run again: keys and edited
# gateway.toml files are kept; the directory is signed again (a higher version) and
# reinstalled, and the broker provisioned again. Start over: rm -r deploy/compose/run.
#
# Environment (all optional):
#   DICOMBRIDGE                        the CLI to run (default: dicombridge)
#   DICOMBRIDGE_COMPOSE_RUN            where generated files go (default: deploy/compose/run)
#   DICOMBRIDGE_MANAGEMENT_URL         a RabbitMQ already running; unset: start the compose
#                                      service `rabbitmq` and use http://127.0.0.1:15672
#   DICOMBRIDGE_BROKER_ADMIN_USER      its administrator (default: admin)
#   DICOMBRIDGE_BROKER_ADMIN_PASSWORD  the administrator's password; unset: generated once
#                                      into RUN/broker-admin-password
#   DICOMBRIDGE_OWNER                  owner of the sites' files (default 10001:10001;
#                                      empty: leave them to the user running this)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
DICOMBRIDGE=${DICOMBRIDGE:-dicombridge}
RUN=${DICOMBRIDGE_COMPOSE_RUN:-$HERE/run}
OWNER=${DICOMBRIDGE_OWNER-10001:10001}
ADMIN=${DICOMBRIDGE_BROKER_ADMIN_USER:-admin}
FEDERATION=dicombridge
VHOST=dicombridge # the vhost in each gateway.toml's [broker] url
SITES="hosp-a hosp-b"

fail() {
    echo "setup.sh: $*" >&2
    exit 1
}

command -v "$DICOMBRIDGE" >/dev/null 2>&1 \
    || fail "no '$DICOMBRIDGE' command: pip install . (or set DICOMBRIDGE)"
if [ -n "$OWNER" ] && [ "$(id -u)" != 0 ] && [ "$(id -u):$(id -g)" != "$OWNER" ]; then
    fail "run as root (sudo) to give the sites' files to $OWNER, the image's user"
fi
umask 077
mkdir -p "$RUN"
OPERATOR=$RUN/operator

# --- the federation operator ------------------------------------------------------------
if [ ! -f "$OPERATOR/operator.key" ]; then
    "$DICOMBRIDGE" operator init --dir "$OPERATOR" --federation "$FEDERATION"
fi
OPERATOR_KEY=$("$DICOMBRIDGE" operator key --dir "$OPERATOR")

# --- each hospital: keys, and the public part handed to the operator ---------------------
for site in $SITES; do
    export_file=$OPERATOR/$site.json
    if [ ! -f "$export_file" ]; then
        scratch=$RUN/$site/init
        rm -rf "$scratch"
        "$DICOMBRIDGE" init --site "$site" --dir "$scratch" \
            --broker-url "amqp://$site@rabbitmq:5672/$VHOST" --operator-key "$OPERATOR_KEY"
        # Plain AMQP inside the compose network (loading the config refuses it otherwise).
        sed -i 's/^\[broker\]$/[broker]\nallow_plain_remote = true/' "$scratch/gateway.toml"
        "$DICOMBRIDGE" keys export --config "$scratch/gateway.toml" >"$export_file.tmp"
        mv "$export_file.tmp" "$export_file"
        # The private keys move to the keys volume; the rest of the scratch site goes (the
        # committed gateway.toml replaces the generated one).
        mkdir -p "$RUN/$site"
        rm -rf "$RUN/$site/keys"
        mv "$scratch/keys" "$RUN/$site/keys"
        rm -rf "$scratch"
    fi
    "$DICOMBRIDGE" directory add-site "$export_file" --dir "$OPERATOR"
done
"$DICOMBRIDGE" directory sign --dir "$OPERATOR"

# --- the broker ------------------------------------------------------------------------
if [ -z "${DICOMBRIDGE_BROKER_ADMIN_PASSWORD:-}" ]; then
    if [ ! -f "$RUN/broker-admin-password" ]; then
        od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$RUN/broker-admin-password"
    fi
    DICOMBRIDGE_BROKER_ADMIN_PASSWORD=$(cat "$RUN/broker-admin-password")
fi
export DICOMBRIDGE_BROKER_ADMIN_PASSWORD
if [ -z "${DICOMBRIDGE_MANAGEMENT_URL:-}" ]; then
    # Read by the rabbitmq container's own user: readable by all, inside RUN (0700).
    printf '%s\n' "# Written by deploy/compose/setup.sh: the administrator that provisions." \
        "default_user = $ADMIN" "default_pass = $DICOMBRIDGE_BROKER_ADMIN_PASSWORD" \
        >"$RUN/rabbitmq.conf"
    chmod 0644 "$RUN/rabbitmq.conf"
    docker compose --project-directory "$TOP" up --detach --wait rabbitmq
    DICOMBRIDGE_MANAGEMENT_URL=http://127.0.0.1:15672
fi
"$DICOMBRIDGE" broker provision --dir "$OPERATOR" --management-url "$DICOMBRIDGE_MANAGEMENT_URL" \
    --admin-user "$ADMIN" --vhost "$VHOST"

# --- install into each site's volumes ------------------------------------------------------
for site in $SITES; do
    mkdir -p "$RUN/$site/config" "$RUN/$site/data"
    config=$RUN/$site/config/gateway.toml
    if [ ! -f "$config" ]; then
        sed "s|^operator_key = \"\"\$|operator_key = \"$OPERATOR_KEY\"|" \
            "$HERE/$site/gateway.toml" >"$config.tmp"
        grep -q "^operator_key = \"$OPERATOR_KEY\"\$" "$config.tmp" \
            || fail "$HERE/$site/gateway.toml has no empty operator_key line to fill in"
        mv "$config.tmp" "$config"
    fi
    cp "$OPERATOR/directory.json" "$RUN/$site/config/directory.json.tmp"
    mv "$RUN/$site/config/directory.json.tmp" "$RUN/$site/config/directory.json"
    install -m 0600 "$OPERATOR/broker-users/$site" "$RUN/$site/keys/broker-password"
    if [ -n "$OWNER" ]; then
        chown -R "$OWNER" "$RUN/$site/config" "$RUN/$site/keys" "$RUN/$site/data"
    fi
    echo "site $site installed in $RUN/$site"
done
echo "next: docker compose up -d (from $TOP)"
