# Sourced by .ci/run before `make test`: Debian's chromium for the real-browser test (tests/test_browser.py).
# Never `playwright install`: Playwright drives the system chromium through executable_path.
if ! command -v chromium >/dev/null 2>&1; then
  _wb_sudo=""
  if [ "$(id -u)" -ne 0 ]; then _wb_sudo="sudo"; fi
  $_wb_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $_wb_sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  unset _wb_sudo
fi
WORKBENCH_CHROMIUM="$(command -v chromium)"
export WORKBENCH_CHROMIUM
# In CI the browser test must run: a missing browser or playwright is a failure there, not a skip.
export WORKBENCH_REQUIRE_BROWSER=1
echo "browser test: $WORKBENCH_CHROMIUM ($("$WORKBENCH_CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
