"""Take docs/status-page.png: the demo's status page after a little traffic, in Chromium.

python -m tests.browser.screenshot [docs/status-page.png] [--width 1280 --height 860]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.browser.chromium import chromium
from tests.procs import free_port

TRAFFIC = (
    "/ifs/main/ifsapplications/projection/v1/CustomerHandling.svc/CustomerInfoSet?$top=2",
    "/ifs/main/ifsapplications/projection/v1/AllProjections.svc/Projections",
    "/pso/IFSSchedulingRESTfulGateway/api/v1/scheduling/data",
    "/infor/ifsservice/usermgt/v2/users/me",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="docs/status-page.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=860)
    args = parser.parse_args()
    proxy, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    demo = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--listen", proxy, "--admin-listen", admin],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        first = demo.stdout.readline()  # printed once every connector is ready
        print(first.strip())
        for round_ in range(3):
            for path in TRAFFIC[: 4 - round_]:
                with urllib.request.urlopen(f"http://{proxy}{path}", timeout=10) as resp:
                    resp.read()
        with chromium(width=args.width, height=args.height) as driver:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            driver.get(f"http://{admin}/")
            driver.find_element(
                By.CSS_SELECTOR, 'article[data-connector="ifs"] button[value="refresh"]'
            ).click()
            WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".banner"))
            driver.execute_script("window.scrollTo(0, 0)")  # the redirect's #anchor scrolled
            driver.save_screenshot(str(Path(args.out)))
        print(f"wrote {args.out}")
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
