"""The identity service: Shoal's certificate authority on the bus.

Event flow: a proxy sends a CSR with a bootstrap token on ``shoal.v1.identity.certify``
(queue group ``shoal-identity``, so replicas share the load); ``tokencheck`` decides who
the token vouches for (a join token, or a Kubernetes service account through
TokenReview, ``kube``); ``authority`` checks the CSR and signs a leaf; ``service``
replies, announces ``CertificateIssued`` / ``CertificateRefused`` on
``shoal.v1.events.identity`` (never key material), keeps ``shoal_trust`` key ``bundle``
in step with the trust-bundle file, and reloads the issuer when its files change (an
issuer rotation needs no restart).

Concurrency: one replica answers its requests one at a time (services/runtime.py);
replicas share nothing but the files they read and the bundle they write.
"""
