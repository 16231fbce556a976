"""TokenReview through the ``kubernetes`` client: asks the API server whether a projected
service account token is genuine and for audience ``identity.shoal.io``.

The client is synchronous, so each review runs in a worker thread with a timeout; an
unreachable or refusing API server becomes ``ReviewUnavailable`` (the proxy retries),
never a refusal of the token.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from .tokencheck import AUDIENCE, ReviewOutcome, ReviewUnavailable

log = logging.getLogger("shoal.identity.kube")

REVIEW_TIMEOUT_SECONDS = 5.0  # the proxy's certify request waits 10 s in all (proxy/identity.py)

ClusterAccess = Literal["in-cluster", "kubeconfig"]


class KubernetesTokenReviewer:
    """A ``TokenReviewer`` over ``AuthenticationV1Api.create_token_review``."""

    def __init__(self, api_client: Any, audience: str = AUDIENCE,
                 timeout: float = REVIEW_TIMEOUT_SECONDS) -> None:
        from kubernetes import client

        self._api = client.AuthenticationV1Api(api_client)
        self.audience = audience
        self.timeout = timeout

    @classmethod
    def connect(cls, access: ClusterAccess, kubeconfig: str | None = None,
                audience: str = AUDIENCE) -> KubernetesTokenReviewer:
        """In a pod: the service account's own credentials; elsewhere: a kubeconfig."""
        from kubernetes import client, config

        configuration = client.Configuration()
        if access == "in-cluster":
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration)
        return cls(client.ApiClient(configuration), audience=audience)

    async def review(self, token: str) -> ReviewOutcome:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._review, token),
                                          self.timeout + 1.0)
        except TimeoutError:
            raise ReviewUnavailable(f"TokenReview took over {self.timeout:.0f} s") from None

    def _review(self, token: str) -> ReviewOutcome:
        from kubernetes import client

        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1", kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            answer = self._api.create_token_review(body, _request_timeout=self.timeout)
        except client.ApiException as error:
            raise ReviewUnavailable(f"TokenReview failed: HTTP {error.status} "
                                    f"{error.reason}") from None
        except Exception as error:  # urllib3 and socket errors: the API is away
            raise ReviewUnavailable(f"TokenReview failed: {type(error).__name__}: "
                                    f"{error}") from None
        status = answer.status
        if status is None:
            raise ReviewUnavailable("TokenReview answer has no status")
        user = status.user
        return ReviewOutcome(
            authenticated=bool(status.authenticated),
            username=(user.username or "") if user is not None else "",
            audiences=tuple(status.audiences or ()),
            error=status.error or "")
