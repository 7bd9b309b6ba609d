# Shared by the benchmark scripts; sourced from the repository root after `set -euo pipefail`.
# BENCH_NAME (default "bench") prefixes log lines.

IMG=${PODFS_BENCH_IMG:-/var/tmp/podfs-bench.img}
MNT=${PODFS_BENCH_MNT:-/mnt/podfs-bench}
log() { printf '%s: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# need_tools COMMAND:PACKAGE...: installs the Debian package of each missing command.
need_tools() {
	local tool
	for tool in "$@"; do
		command -v "${tool%%:*}" >/dev/null || { log "installing ${tool#*:}"; apt-get install -y -q "${tool#*:}" >&2; }
	done
}

# The trees live on a loop-mounted ext4 without discard (see BENCHMARKING.md in the design
# notes): the root disk's small-file timings are meaningless. Needs root.
loop_mount() {
	if ! mountpoint -q "$MNT"; then
		log "creating a loop-mounted ext4 at $MNT"
		truncate -s 8G "$IMG" && mkfs.ext4 -q -F "$IMG"
		mkdir -p "$MNT" && mount -o loop,noatime "$IMG" "$MNT"
	fi
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# fresh_database PREFIX: creates database PREFIX_<pid>_<time> on the dev PostgreSQL; sets db and
# DB_URL.
fresh_database() {
	db=$1_$$_$(date +%s)
	psql -q "$PODFS_TEST_DATABASE_URL" -c "CREATE DATABASE $db" >/dev/null
	DB_URL=${PODFS_TEST_DATABASE_URL%/*}/$db
}

# start_bench_gateway GATEWAY_BINARY DATA_DIR: a gateway on $DB_URL and a fresh prefix of the dev
# bucket (bench-$db), on a free port; sets GW_PID and exports PODFS_GATEWAY and PODFS_TOKEN.
start_bench_gateway() {
	local store_base bucket_part port
	store_base=${PODFS_TEST_BLOB_STORE:-$PODFS_BLOB_STORE}
	bucket_part=${store_base%%\?*}
	port=$(free_port)
	export PODFS_GATEWAY=http://127.0.0.1:$port PODFS_TOKEN=bench-admin-token-0123456789
	PODFS_ADMIN_TOKEN=$PODFS_TOKEN DATABASE_URL=$DB_URL \
		PODFS_BLOB_STORE="${bucket_part%/}/bench-$db${store_base#"$bucket_part"}" \
		"$1" --listen "127.0.0.1:$port" --data-dir "$2/gw" 2>"$2/gw.log" &
	GW_PID=$!
	for _ in $(seq 100); do curl -sf "$PODFS_GATEWAY/healthz" >/dev/null && return 0; sleep 0.1; done
	die "the gateway did not start (see $2/gw.log)"
}

stop_pid() { # PID: SIGTERM, then SIGKILL after 5 s
	local pid=$1
	[ -n "$pid" ] || return 0
	kill "$pid" 2>/dev/null || return 0
	for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
	kill -9 "$pid" 2>/dev/null || true
}

# The npm corpus (a real node_modules): npm ci once per lockfile into $NPM_CACHE, kept across
# runs; prints its directory.
NPM_CACHE=${PODFS_BENCH_NPM_CACHE:-/var/tmp/podfs-bench-npm}
npm_tree() {
	local hash dir tmp
	hash=$(cat benches/npm/package.json benches/npm/package-lock.json | sha256sum | cut -c1-16)
	dir=$NPM_CACHE/$hash
	if [ ! -d "$dir/node_modules" ]; then
		log "npm ci of benches/npm/package-lock.json into $dir (once)"
		tmp=$NPM_CACHE/tmp-$$
		rm -rf "$tmp" && mkdir -p "$tmp"
		cp benches/npm/package.json benches/npm/package-lock.json "$tmp/"
		# npm ci refuses a lockfile without the optional packages of other platforms, which a
		# registry mirror may not serve (this workplace's does not): npm install then installs
		# the locked versions and skips what the registry lacks.
		(cd "$tmp" && { npm ci --ignore-scripts --no-audit --no-fund --loglevel=silent >&2 ||
			npm install --ignore-scripts --no-audit --no-fund --no-save --loglevel=error >&2; })
		rm -f "$tmp/package.json" "$tmp/package-lock.json"
		mv "$tmp" "$dir"
	fi
	echo "$dir"
}
