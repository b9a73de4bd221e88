# Sourced by `make pytest`: point the PostgreSQL tests at a server when one answers.
# The suite always runs on SQLite; PostgreSQL runs whenever PROSPECT_MAILER_TEST_POSTGRES_URL
# is set. When it is unset and nothing answers on 127.0.0.1:5432, say so loudly: those tests
# are skipped, not passed.
if [ -z "${PROSPECT_MAILER_TEST_POSTGRES_URL:-}" ]; then
  if .venv/bin/python - <<'PY' 2>/dev/null
import asyncio, sys
import asyncpg
async def main():
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=3)
    await conn.close()
try:
    asyncio.run(main())
except Exception:
    sys.exit(1)
PY
  then
    export PROSPECT_MAILER_TEST_POSTGRES_URL="postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    echo "postgres: server found, store tests run on SQLite AND $PROSPECT_MAILER_TEST_POSTGRES_URL"
  else
    echo "################################################################################"
    echo "## WARNING: no PostgreSQL on 127.0.0.1:5432 and PROSPECT_MAILER_TEST_POSTGRES_URL"
    echo "## is unset: every PostgreSQL test is SKIPPED (SQLite tests still run)."
    echo "################################################################################"
  fi
fi
