#!/bin/sh
# Runs the command given, then hands what root wrote under /runs to the owner of /runs itself (the host
# folder bind-mounted there: docker/docker-compose.yml), so run directories written in the containers
# belong to the host user who owns that folder. Exits with the command's status.
"$@"
status=$?
owner=$(stat -c %u:%g /runs)
if [ "$owner" != 0:0 ]; then
  find /runs -xdev -uid 0 -exec chown -h "$owner" {} + || echo "run_as_runs_owner: could not give /runs to $owner" >&2
fi
exit $status
