#!/usr/bin/env bash
# Builds the container images of deploy/docker with rootful podman, runs them on
# loopback and probes the demo Dovecot from the exporter container. CI runs it after
# the test suite (.ci/run); docs/container.md says what it checks and why.
#
#   bash deploy/docker/build-and-test.sh        (as root, on Debian 12)
#
# Everything this machine needs to build images without a Docker daemon or registry
# access lives here, not in the Dockerfiles (which stay what a Docker user builds):
#   - podman, runc, mmdebstrap and docker-compose are installed from Debian if missing;
#   - podman runs with a private containers.conf (CONTAINERS_CONF): runc instead of
#     crun, cgroupfs and no journald (no systemd here), default ulimits no higher than
#     the hard limits of this sandbox; and a private registries.conf that resolves no
#     short name to a registry, so nothing is ever pulled;
#   - the base images debian:bookworm-slim and python:3.11-slim-bookworm are stand-ins:
#     the first bootstrapped with mmdebstrap from the machine's own Debian sources, the
#     second Debian's python3 built on it; podman's storage keeps them for the next run
#     (an image of that name without the stand-in label, e.g. the real one tagged
#     locally, is used as it is);
#   - the build mounts the host's CA bundle read-only (outbound TLS to the package
#     index may be re-signed) and uses the host network;
#   - containers run on the host network with every listener moved to 127.0.0.1.
set -Eeuo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

readonly IMAGE=localhost/pop3_exporter:ci
readonly BUILD_STAGE_IMAGE=localhost/pop3_exporter:ci-build
readonly DEMO_IMAGE=localhost/pop3-dovecot-demo:ci
readonly PYTHON_BASE=python:3.11-slim-bookworm
readonly DEBIAN_BASE=debian:bookworm-slim
# Every image and container this script makes carries this label, so that it prunes
# only its own leftovers.
readonly LABEL=org.pop3-exporter.ci
readonly STANDIN_LABEL=org.pop3-exporter.stand-in
# Budgets, in MB (10^6 bytes), for what each Dockerfile adds on top of its base image
# (independent of whether the base is a stand-in or the real image). Measured when they
# were set: exporter 59.5 MB (a venv with aiohttp, cryptography, pip), demo 61.8 MB
# (Dovecot, OpenSSL and their libraries from Debian). Raise them deliberately, in
# docs/container.md too, when a dependency really needs the room.
readonly EXPORTER_BUDGET_MB=80
readonly DEMO_BUDGET_MB=80
# Fixed by the images: their HEALTHCHECKs ask 10110 and 110; the demo has POP3S on 995.
readonly EXPORTER_PORT=10110
readonly POP3_PORT=110
readonly POP3S_PORT=995
readonly CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

step() { printf '==> [%3ds] %s\n' "$SECONDS" "$*"; }
fail() {
    printf 'build-and-test: FAIL: %s\n' "$*" >&2
    exit 1
}
passed=0
pass() { passed=$((passed + 1)); } # one more check held

trap 'printf "build-and-test: FAIL: line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

[[ $(id -u) -eq 0 ]] || fail "run as root: the images are built and run with rootful podman"

# One run at a time: the ports of the health checks and the image tags are fixed.
lockdir=/run/lock
[[ -d $lockdir ]] || lockdir=/tmp
exec 9>"$lockdir/pop3_exporter-build-and-test.lock"
flock --wait 900 9 || fail "another build-and-test.sh run still holds its lock after 15 min"

containers=()
host_pids=()
workdir=$(mktemp -d /tmp/pop3-image-test.XXXXXX)
bootstrap_tmp=$workdir

kill_tree() { # pid: a process this script started and everything it started
    local child
    for child in $(ps -o pid= --ppid "$1" || true); do
        kill_tree "$child"
    done
    kill "$1" 2>/dev/null || true
}

cleanup() {
    local rc=$? id pid
    trap - EXIT INT TERM ERR
    if ((rc != 0)); then
        for id in "${containers[@]}"; do
            echo "---- last log lines of container ${id:0:12}" >&2
            podman logs --tail 25 "$id" >&2 2>&1 || true
        done
    fi
    for pid in "${host_pids[@]}"; do
        kill_tree "$pid"
        wait "$pid" 2>/dev/null || true
    done
    for id in "${containers[@]}"; do
        # podman also reports that it has no systemd timer to remove; only a failure
        # to remove the container matters.
        podman rm --force --time 2 "$id" >/dev/null 2>&1 ||
            echo "build-and-test: warning: could not remove container $id" >&2
    done
    rm -rf "$workdir" "$bootstrap_tmp"
    ((rc == 0)) || echo "build-and-test: FAILED after $passed checks passed"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "build-and-test: interrupted" >&2; exit 130' INT
trap 'echo "build-and-test: terminated" >&2; exit 143' TERM

# ------------------------------------------------------------------ tools
step "checking the container tools"
packages=(podman runc mmdebstrap docker-compose curl iproute2)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$package")
done
if ((${#missing[@]})); then
    echo "installing from Debian: ${missing[*]}"
    apt-get update -q >"$workdir/apt.log" 2>&1 || {
        cat "$workdir/apt.log" >&2
        fail "apt-get update failed"
    }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >>"$workdir/apt.log" 2>&1 || {
        tail -30 "$workdir/apt.log" >&2
        fail "could not install ${missing[*]}"
    }
fi

nofile=$(ulimit -Hn)
if [[ $nofile == unlimited ]] || ((nofile > 20000)); then nofile=20000; fi
nproc=$(ulimit -Hu)
if [[ $nproc == unlimited ]] || ((nproc > 32768)); then nproc=32768; fi
cat >"$workdir/containers.conf" <<EOF
# Private podman configuration of deploy/docker/build-and-test.sh.
[containers]
# podman's defaults (nofile 1048576) are above this sandbox's hard limits.
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
# crun cannot set its rlimits here and has no cgroups v1 hybrid support; no systemd.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$workdir/registries.conf" <<'EOF'
# No short name resolves to a registry: base images are local (stand-ins or tagged).
unqualified-search-registries = []
short-name-mode = "enforcing"
EOF
export CONTAINERS_CONF=$workdir/containers.conf
export CONTAINERS_REGISTRIES_CONF=$workdir/registries.conf
echo "$(podman --version), runc $(runc --version | head -1 | cut -d' ' -f3)," \
    "ulimits nofile=$nofile nproc=$nproc"

# ------------------------------------------------------------------ base images
# The stand-ins: Debian bookworm (what both official images are built from), slimmed
# like the official images (no documentation, manual pages or translations), with
# Debian's python3 (3.11) where the official image has its own build in /usr/local.
slim_options=(
    --variant=minbase
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt=force-unsafe-io
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
)
# The machine's own Debian sources and the apt settings they need (a snapshot mirror
# can serve Release files past their Valid-Until date). They stay in the image, so that
# the Dovecot demo's `apt-get update` works the same way.
mirrors=()
if grep -qx "VERSION_CODENAME=bookworm" /etc/os-release; then
    for sources in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [[ -s $sources ]]; then
            mirrors=("$sources")
            break
        fi
    done
fi
for option in Acquire::Check-Valid-Until Acquire::Check-Date; do
    value=$(apt-config shell value "$option" | sed -n "s/^value='\(.*\)'$/\1/p")
    [[ -z $value ]] || slim_options+=("--aptopt=$option \"$value\"")
done
# As in the official images: apt keeps no package files or binary caches after an
# install, and fetches no translations (the images that build on the base stay slim).
# With these settings `apt-get clean` no longer finds the binary caches: the hook that
# installs them removes those of the bootstrap itself.
# shellcheck disable=SC2016 # $1 (the chroot) and $APT_SLIM are expanded by mmdebstrap's sh
slim_options+=(
    --customize-hook='printf "%s\n" "$APT_SLIM" >"$1/etc/apt/apt.conf.d/docker-clean"'
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin'
)
apt_slim='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";'
python_recipe="FROM $DEBIAN_BASE
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
       python3 python3-venv python3-pip python-is-python3 ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8
CMD [\"python3\"]"

key_of() { sha256sum | cut -c1-16; } # a digest of everything a stand-in is made from
debian_key=$(
    {
        echo "debian stand-in"
        printf '%s\n' "${slim_options[@]}" "$apt_slim"
        [[ ${#mirrors[@]} -eq 0 ]] || cat "${mirrors[@]}"
    } | key_of
)

standin_state() { # name key: current, foreign (not a stand-in), missing or stale:<key>
    local have
    if ! podman image exists "$1"; then
        echo missing
        return
    fi
    have=$(podman image inspect --format "{{index .Labels \"$STANDIN_LABEL\"}}" "$1")
    if [[ -z $have || $have == "<no value>" ]]; then
        echo foreign
    elif [[ $have == "$2" ]]; then
        echo current
    else
        echo "stale:$have"
    fi
}

say_standin() { # name state key: whether it is made, and why
    case $2 in
    current) echo "    $1: stand-in from an earlier run (recipe $3)" ;;
    foreign) echo "    $1: the local image of that name (not a stand-in)" ;;
    missing) echo "    $1: not available locally (no registry is reachable here);" \
        "making a stand-in from Debian packages (recipe $3)" ;;
    *) echo "    $1: stand-in recipe changed (${2#stale:} -> $3), making it again" ;;
    esac
}

ensure_debian_base() { # mmdebstrap, then import under the short name
    local state tar log=$workdir/bootstrap.log
    state=$(standin_state "$DEBIAN_BASE" "$debian_key")
    say_standin "$DEBIAN_BASE" "$state" "$debian_key"
    [[ $state == current || $state == foreign ]] && return
    # mmdebstrap is several times faster in memory than on this disk (dpkg syncs).
    if [[ -d /dev/shm ]] && (($(df --output=avail -k /dev/shm | tail -1) > 1024 * 1024)); then
        bootstrap_tmp=$(mktemp -d /dev/shm/pop3-image-test.XXXXXX)
    fi
    tar=$bootstrap_tmp/debian.tar
    APT_SLIM=$apt_slim TMPDIR=$bootstrap_tmp mmdebstrap "${slim_options[@]}" \
        bookworm "$tar" "${mirrors[@]}" >"$log" 2>&1 || {
        tail -30 "$log" >&2
        fail "mmdebstrap could not bootstrap $DEBIAN_BASE (log above)"
    }
    podman import --quiet \
        --change "LABEL $STANDIN_LABEL=$debian_key" --change "LABEL $LABEL=stand-in" \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
        "$tar" "$DEBIAN_BASE" >/dev/null
    rm -f "$tar"
    echo "    $DEBIAN_BASE: stand-in ready [${SECONDS}s]"
}

ensure_python_base() { # Debian's python3 (3.11) on the Debian base, built with podman
    local key state
    key=$(
        {
            echo "$python_recipe"
            podman image inspect --format '{{.Id}}' "$DEBIAN_BASE"
        } | key_of
    )
    state=$(standin_state "$PYTHON_BASE" "$key")
    say_standin "$PYTHON_BASE" "$state" "$key"
    [[ $state == current || $state == foreign ]] && return
    { printf '%s\n' "$python_recipe" && echo "LABEL $STANDIN_LABEL=$key $LABEL=stand-in"; } \
        >"$workdir/python-standin.Containerfile"
    build "the stand-in $PYTHON_BASE" "$workdir/build-python.log" \
        --tag "$PYTHON_BASE" --file "$workdir/python-standin.Containerfile" "$workdir/empty"
    echo "    $PYTHON_BASE: stand-in ready [${SECONDS}s]"
}

build() { # what log podman-build-arguments...
    local what=$1 log=$2
    shift 2
    podman build --pull=never --format docker --network host --force-rm \
        --label "$LABEL=build-and-test" "$@" >>"$log" 2>&1 || {
        tail -40 "$log" >&2
        fail "building $what failed (podman build output above)"
    }
}
ca_mount=()
[[ -s $CA_BUNDLE ]] && ca_mount=(--volume "$CA_BUNDLE:$CA_BUNDLE:ro")

build_demo() {
    build "the Dovecot demo image" "$workdir/build-demo.log" \
        --tag "$DEMO_IMAGE" deploy/docker/dovecot-demo
    echo "    $DEMO_IMAGE built [${SECONDS}s]"
}

build_exporter() {
    # The build stage is tagged too: untagged it would be pruned below, and with it the
    # cached pip install that makes a repeated build take seconds.
    build "the exporter image (stage build)" "$workdir/build-exporter.log" "${ca_mount[@]}" \
        --target build --tag "$BUILD_STAGE_IMAGE" --file deploy/docker/Dockerfile .
    build "the exporter image" "$workdir/build-exporter.log" "${ca_mount[@]}" \
        --tag "$IMAGE" --file deploy/docker/Dockerfile .
    echo "    $IMAGE built [${SECONDS}s]"
}

# The demo image is built while the Python base is made on the same Debian base.
step "base images $DEBIAN_BASE and $PYTHON_BASE; building $DEMO_IMAGE" \
    "(deploy/docker/dovecot-demo) and $IMAGE (deploy/docker/Dockerfile)"
mkdir "$workdir/empty"
ensure_debian_base
build_demo &
demo_job=$!
host_pids+=("$demo_job")
ensure_python_base
build_exporter
wait "$demo_job" || fail "could not build $DEMO_IMAGE"
host_pids=()
pass
pass

# Images replaced by this build (and stand-ins of an old recipe) are left untagged.
podman image prune --force --filter "label=$LABEL" >/dev/null

# ------------------------------------------------------------------ sizes
size_of() { podman image inspect --format '{{.Size}}' "$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
check_size() { # image base budget_mb
    local total base added
    total=$(size_of "$1")
    base=$(size_of "$2")
    added=$((total - base))
    printf '    %-32s %7s MB (%s MB on top of %s; budget %s MB)\n' \
        "$1" "$(mb "$total")" "$(mb "$added")" "$2" "$3"
    ((added <= $3 * 1000000)) ||
        fail "$1 adds $(mb "$added") MB to its base, over its budget of $3 MB" \
            "(docs/container.md)"
    pass
}
step "image sizes"
check_size "$IMAGE" "$PYTHON_BASE" "$EXPORTER_BUDGET_MB"
check_size "$DEMO_IMAGE" "$DEBIAN_BASE" "$DEMO_BUDGET_MB"

# ------------------------------------------------------------------ compose file
step "checking deploy/docker/docker-compose.yml"
# Debian's docker-compose (1.29) validates against the compose specification without a
# daemon, but predates the top-level `name` key: that one is checked here and left out.
compose=deploy/docker/docker-compose.yml
project_name=$(sed -n 's/^name: *//p' "$compose")
[[ $project_name =~ ^[a-z0-9][a-z0-9_-]*$ ]] ||
    fail "$compose: top-level name '$project_name' is not a valid compose project name"
grep -v '^name:' "$compose" >"$workdir/compose.yml"
docker-compose --file "$workdir/compose.yml" --project-directory deploy/docker \
    config --quiet 2>"$workdir/compose.err" || {
    sed "s|$workdir/compose.yml|$compose|g" "$workdir/compose.err" >&2
    fail "$compose does not validate"
}
services=$(docker-compose --file "$workdir/compose.yml" --project-directory deploy/docker \
    config --services | sort | paste -sd' ')
[[ $services == "alertmanager dovecot-demo grafana pop3-exporter prometheus" ]] ||
    fail "$compose: unexpected services: $services"
echo "    valid; services: $services"
pass

# ------------------------------------------------------------------ run
port_free() { # port: nothing listens on it, on any address
    [[ -z $(ss -Hltn "sport = :$1") ]]
}
free_port() { # an unused loopback port
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
for port in "$POP3_PORT" "$POP3S_PORT" "$EXPORTER_PORT"; do
    port_free "$port" || fail "port $port is in use (the images' health checks need it):" \
        "$(ss -Hltnp "sport = :$port" | head -3)"
done

run_container() { # name podman-run-arguments... ; sets $cid
    local name=$1
    shift
    cid=$(podman run --detach --pull=never --network host --label "$LABEL=build-and-test" \
        "$@" 2>"$workdir/run.err") || {
        cat "$workdir/run.err" >&2
        fail "could not start the $name container"
    }
    containers+=("$cid")
    # Without systemd podman cannot schedule health checks itself (they are run below).
    grep -v 'unable to get systemd connection' "$workdir/run.err" >&2 || true
}

wait_healthy() { # id name: runs the image's HEALTHCHECK until it passes
    local deadline=$((SECONDS + 60)) state
    until podman healthcheck run "$1" >"$workdir/health.out" 2>&1; do
        state=$(podman inspect --format '{{.State.Status}}' "$1")
        [[ $state == running ]] || fail "the $2 container is $state before it became healthy"
        grep -q 'no defined healthcheck' "$workdir/health.out" &&
            fail "the $2 image has no HEALTHCHECK (was it built with --format docker?)"
        ((SECONDS < deadline)) || fail "the $2 container is not healthy after 60 s"
        sleep 0.5
    done
    echo "    $2: healthy ($(podman inspect --format '{{.State.Health.Status}}' "$1"))"
    pass
}

wait_http() { # url name
    local deadline=$((SECONDS + 30))
    until curl -fsS --max-time 2 "$1" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$2 does not answer $1 after 30 s"
        sleep 0.3
    done
}

only_loopback() { # id name: every socket the container's processes listen on is loopback
    local pids listeners bad
    pids=$(podman top "$1" hpid | tail -n +2 | tr -d ' ' | paste -sd'|')
    [[ -n $pids ]] || fail "no processes in the $2 container"
    listeners=$(ss -Hltunp | grep -E "[(,]pid=($pids)," || true)
    [[ -n $listeners ]] || fail "the $2 container listens on nothing"
    bad=$(awk '$5 !~ /^(127\.[0-9.]+|\[::1\]):[0-9]+$/' <<<"$listeners")
    [[ -z $bad ]] || fail "the $2 container listens beyond loopback: $bad"
    echo "    $2 listens on: $(awk '{print $1 "/" $5}' <<<"$listeners" | sort -u | paste -sd' ')"
    pass
}

step "starting the Dovecot demo (host network, 127.0.0.1:$POP3_PORT and :$POP3S_PORT)"
pki=$workdir/demo-pki
mkdir -m 0755 "$pki"
# The demo listens on every address (it runs on a compose network); here that would be
# the host's, so the entrypoint passes a loopback listen setting on to dovecot.
run_container "Dovecot demo" --volume "$pki:/demo-pki" "$DEMO_IMAGE" -o listen=127.0.0.1
demo=$cid
wait_healthy "$demo" "Dovecot demo"
only_loopback "$demo" "Dovecot demo"
[[ -s $pki/dovecot-demo.crt ]] || fail "the demo did not publish its certificate in /demo-pki"

step "starting the exporter image with its own configuration (deploy/pop3_exporter.yml)"
# The image's command, with the listen address moved from every address to loopback.
mapfile -t command < <(podman image inspect --format '{{range .Config.Cmd}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
listen_arg="--web.listen-address=:$EXPORTER_PORT"
[[ " ${command[*]} " == *" $listen_arg "* ]] ||
    fail "the image's CMD (${command[*]}) no longer contains $listen_arg; update this script"
command=("${command[@]/#$listen_arg/--web.listen-address=127.0.0.1:$EXPORTER_PORT}")
# As in the compose file and the Kubernetes manifests: read-only, no capabilities.
hardening=(--read-only --cap-drop ALL --security-opt no-new-privileges)
run_container exporter "${hardening[@]}" --volume "$pki:/demo-pki:ro" "$IMAGE" "${command[@]}"
exporter=$cid
wait_healthy "$exporter" exporter
only_loopback "$exporter" exporter
pid=$(podman inspect --format '{{.State.Pid}}' "$exporter")
ids=$(awk '/^Uid:|^Gid:/ {print $1, $2, $3, $4, $5}' "/proc/$pid/status" | paste -sd' ')
[[ $ids == "Uid: 10110 10110 10110 10110 Gid: 10110 10110 10110 10110" ]] ||
    fail "the exporter does not run as uid/gid 10110: $ids"
echo "    exporter runs as uid 10110, gid 10110 (/proc/$pid/status)"
pass

step "starting the exporter image with the compose demo configuration"
demo_port=$(free_port)
run_container "exporter (compose configuration)" "${hardening[@]}" \
    --volume "$pki:/demo-pki:ro" \
    --volume "$repo/deploy/docker/pop3_exporter.yml:/etc/pop3_exporter/pop3_exporter.yml:ro" \
    "$IMAGE" --config.file=/etc/pop3_exporter/pop3_exporter.yml \
    "--web.listen-address=127.0.0.1:$demo_port"
wait_http "http://127.0.0.1:$demo_port/-/healthy" "the exporter with the compose configuration"

step "starting the host's exporter (.venv) for comparison"
[[ -x .venv/bin/pop3_exporter ]] ||
    fail ".venv/bin/pop3_exporter is missing: run .ci/setup.sh first (the image is compared with it)"
host_port=$(free_port)
.venv/bin/pop3_exporter --config.file=deploy/pop3_exporter.yml \
    "--web.listen-address=127.0.0.1:$host_port" >"$workdir/host-exporter.log" 2>&1 &
host_pids+=($!)
wait_http "http://127.0.0.1:$host_port/-/healthy" "the host's exporter"

# ------------------------------------------------------------------ probes
probe() { # port module target: the /probe body
    curl -fsS --max-time 20 "http://127.0.0.1:$1/probe?target=$2&module=$3" ||
        fail "/probe?target=$2&module=$3 on port $1 did not answer 200"
}
value_of() { # body metric-with-labels
    awk -v m="$2" '$1 == m { printf "%d", $2; found = 1 } END { if (!found) printf "absent" }' <<<"$1"
}
reasons_of() { # body: the failure reasons set to 1
    sed -n 's/^probe_pop3_failure{reason="\([a-z_]*\)"} 1\(\.0\)*$/\1/p' <<<"$1" | paste -sd, -
}
# What may differ between two probes of the same server: durations and timeouts.
stable() { grep -v '^#' | grep -Ev '^[a-z0-9_]+_seconds[{ ]' | sort; }

expect() { # port module target success reason [tls_valid]
    local body success reasons tls_valid want_reason=${5/#-/}
    body=$(probe "$1" "$3" "$2")
    success=$(value_of "$body" probe_success)
    reasons=$(reasons_of "$body")
    tls_valid=$(value_of "$body" probe_tls_valid)
    printf '    %-22s %-16s probe_success=%s failure=%s tls_valid=%s\n' \
        "$2" "$3" "$success" "${reasons:--}" "$tls_valid"
    [[ $success == "$4" && $reasons == "$want_reason" ]] ||
        fail "module $2 on $3: expected probe_success=$4 failure=${5}, got" \
            "probe_success=$success failure=${reasons:--}"
    [[ -z ${6:-} || $tls_valid == "$6" ]] ||
        fail "module $2 on $3: expected probe_tls_valid=$6, got $tls_valid"
    if [[ -n ${6:-} ]]; then
        # The certificate is reported also when it is not trusted.
        grep -q '^probe_ssl_last_chain_info{.*subject="CN=dovecot-demo"' <<<"$body" ||
            fail "module $2 on $3: no probe_ssl_last_chain_info for CN=dovecot-demo"
    fi
    last_body=$body
    pass
}

closed=$(free_port)
step "probing the demo from the exporter container (deploy/pop3_exporter.yml modules)"
cases=(
    "pop3 127.0.0.1:$POP3_PORT 1 - "
    "pop3_starttls 127.0.0.1:$POP3_PORT 0 tls_cert_untrusted 0"
    "pop3s 127.0.0.1:$POP3S_PORT 0 tls_cert_untrusted 0"
    "pop3s_dovecot 127.0.0.1:$POP3S_PORT 0 tls_cert_untrusted 0"
    "pop3_starttls_legacy 127.0.0.1:$POP3_PORT 0 tls_cert_untrusted 0"
    "pop3s_ipv4 127.0.0.1:$POP3S_PORT 0 tls_cert_untrusted 0"
    "pop3 127.0.0.1:$closed 0 connect_refused "
)
for case in "${cases[@]}"; do
    read -r module target success reason tls_valid <<<"$case"
    expect "$EXPORTER_PORT" "$module" "$target" "$success" "$reason" "$tls_valid"
    container_body=$last_body
    # The same probe from the exporter installed on the host must say the same.
    host_body=$(probe "$host_port" "$target" "$module")
    diff <(stable <<<"$container_body") <(stable <<<"$host_body") >"$workdir/diff" || {
        cat "$workdir/diff" >&2
        fail "module $module on $target: the image's /probe differs from the host's" \
            "(< image, > host)"
    }
    compared=$(stable <<<"$container_body" | wc -l)
    pass
done
echo "    the host's exporter gives the same metrics for all ${#cases[@]} probes" \
    "(durations aside; $compared lines in the last one)"

step "probing the demo with the compose configuration (its certificate trusted)"
expect "$demo_port" pop3s_demo "127.0.0.1:$POP3S_PORT" 1 - 1
expect "$demo_port" pop3_starttls_demo "127.0.0.1:$POP3_PORT" 1 - 1

step "done in ${SECONDS}s: both images build, start healthy as configured and probe as documented"
echo "build-and-test: all $passed checks passed"
