#!/bin/sh
# Installs fieldlink-agent from its tarball (run from the unpacked directory, as root):
#
#   ./install.sh                   # onto this system
#   DESTDIR=/mnt/rootfs ./install.sh   # into a root filesystem (an SD card image, a chroot): no systemctl calls
#
# What the .deb does: the binary to /usr/bin, the units to /etc/systemd/system/ (the drain's never enabled), the
# system user and group `fieldlink`, /etc/fieldlink/agent.toml from the example only if there is none
# (root:fieldlink, 0640; an existing configuration is never touched), /var/lib/fieldlink (the buffer; fieldlink,
# 0750), the example beside the docs. On a running systemd it enables the service without starting it (the example
# names no real broker or stream) and restarts an agent that is running if the new version accepts its configuration
# (an upgrade: it seals and drains on SIGTERM, the new binary resumes from the same buffer). Site changes to the
# unit belong in a drop-in (/etc/systemd/system/fieldlink-agent.service.d/*.conf): an upgrade replaces the unit.
# POSIX sh (BusyBox works).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

# The system user and group (useradd, or BusyBox's adduser on a running system).
if ! grep -q '^fieldlink:' "$root/etc/passwd" 2>/dev/null; then
    if command -v useradd >/dev/null 2>&1; then
        set -- --system --user-group --home-dir /var/lib/fieldlink --no-create-home --shell /usr/sbin/nologin
        if [ -n "$root" ]; then useradd --prefix "$root" "$@" fieldlink; else useradd "$@" fieldlink; fi
    elif [ -z "$root" ] && command -v adduser >/dev/null 2>&1; then
        addgroup -S fieldlink
        adduser -S -D -H -h /var/lib/fieldlink -s /sbin/nologin -G fieldlink fieldlink
    else
        echo "install.sh: no useradd (or BusyBox adduser) to create the user fieldlink" >&2
        exit 1
    fi
fi
gid=$(sed -n 's/^fieldlink:[^:]*:\([0-9]*\):.*/\1/p' "$root/etc/group")
uid=$(sed -n 's/^fieldlink:[^:]*:\([0-9]*\):.*/\1/p' "$root/etc/passwd")

upgrade=0
[ -e "$root/usr/bin/fieldlink-agent" ] && upgrade=1
# An upgrade restarts a running agent only if the new version accepts the configuration (a refused one would stop
# a working agent for good: ExecStartPre runs check-config); the running agent keeps the old version meanwhile.
# Into another root likewise, if the binary runs here (it may be for another architecture); on this system, a binary
# that does not run here (another architecture, a libc too old) is not restarted into either.
accepted=1
if [ "$upgrade" = 1 ] && [ -e "$root/etc/fieldlink/agent.toml" ]; then
    if ! "$here/fieldlink-agent" --version >/dev/null 2>&1; then
        if [ -z "$root" ]; then
            accepted=0
            echo "fieldlink-agent: NOT restarted: the new binary does not run on this system (another architecture?)" >&2
        fi
    elif ! problems=$("$here/fieldlink-agent" check-config --config "$root/etc/fieldlink/agent.toml" 2>&1); then
        accepted=0
        echo "fieldlink-agent: NOT restarted: this version refuses /etc/fieldlink/agent.toml:" >&2
        echo "$problems" >&2
        echo "fieldlink-agent: a running agent keeps the old version until it restarts (then systemd retries every" \
            "10 s); fix the configuration, check it with 'fieldlink-agent check-config'," \
            "then 'systemctl restart fieldlink-agent'." >&2
    fi
fi
mkdir -p "$root/usr/bin" "$root/etc/systemd/system" "$root/etc/fieldlink" "$root/usr/share/doc/fieldlink-agent"
# Replace the binary by rename, so a running agent keeps its old file.
cp "$here/fieldlink-agent" "$root/usr/bin/.fieldlink-agent.new"
chmod 0755 "$root/usr/bin/.fieldlink-agent.new"
mv -f "$root/usr/bin/.fieldlink-agent.new" "$root/usr/bin/fieldlink-agent"
for unit in fieldlink-agent.service fieldlink-agent-drain.service; do
    cp "$here/$unit" "$root/etc/systemd/system/$unit"
    chmod 0644 "$root/etc/systemd/system/$unit"
done
cp "$here/agent.example.toml" "$root/usr/share/doc/fieldlink-agent/agent.example.toml"
chmod 0644 "$root/usr/share/doc/fieldlink-agent/agent.example.toml"
fresh=0
if [ ! -e "$root/etc/fieldlink/agent.toml" ]; then
    cp "$here/agent.example.toml" "$root/etc/fieldlink/agent.toml"
    chown "0:$gid" "$root/etc/fieldlink/agent.toml"
    chmod 0640 "$root/etc/fieldlink/agent.toml"
    fresh=1
fi
mkdir -p "$root/var/lib/fieldlink"
# The whole tree: a buffer kept across a re-image belongs to the old uid, and systemd's StateDirectory= fixes
# ownership only when the directory itself is not already the user's.
chown -hR "$uid:$gid" "$root/var/lib/fieldlink"   # -h: a link in the tree is changed, never followed
chmod 0750 "$root/var/lib/fieldlink"

if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable fieldlink-agent.service >/dev/null 2>&1 || true
    if [ "$upgrade" = 1 ] && [ "$accepted" = 1 ]; then systemctl try-restart fieldlink-agent.service || true; fi
fi
if [ "$fresh" = 1 ]; then
    echo "fieldlink-agent: edit /etc/fieldlink/agent.toml, check it with 'fieldlink-agent check-config'," \
        "then 'systemctl start fieldlink-agent'."
else
    echo "fieldlink-agent: kept /etc/fieldlink/agent.toml; the new example is /usr/share/doc/fieldlink-agent/agent.example.toml"
fi
