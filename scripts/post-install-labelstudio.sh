#!/usr/bin/env bash
# After bootstrap.sh has installed requirements/labelstudio.lock into VENV: apply Label Studio's
# database migrations once into VENV/share/label-studio/migrated.sqlite3, a template the server
# tests copy into their temp data dir. Migrating SQLite is most of a cold `label-studio start`
# (about 25 s of its 28 s on 2 cores); from a migrated copy the server is up in about 3 s.
#   bash scripts/post-install-labelstudio.sh .venv-labelstudio
# `label-studio version` migrates the database, prints versions and exits; nothing is fetched
# (no version check, no Sentry, no analytics).
set -euo pipefail
venv=$(cd "${1:?usage: post-install-labelstudio.sh VENV}" && pwd)
dest="$venv/share/label-studio"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "post-install-labelstudio: migrating a template SQLite database"
env -i PATH="$venv/bin:/usr/bin:/bin" HOME="$work" LANG=C.UTF-8 \
  LABEL_STUDIO_BASE_DATA_DIR="$work" DJANGO_DB=sqlite SECRET_KEY=template-only-not-used-by-a-server \
  LATEST_VERSION_CHECK=false SENTRY_DSN= FRONTEND_SENTRY_DSN= COLLECT_ANALYTICS=false \
  "$venv/bin/label-studio" version > "$work/migrate.log" 2>&1 || { tail -20 "$work/migrate.log" >&2; exit 1; }
mkdir -p "$dest"
mv "$work/label_studio.sqlite3" "$dest/migrated.sqlite3"
