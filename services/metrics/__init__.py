"""The metrics service: aggregates proxies' reports into rolling windows and answers
``viz stat|top|edges|routes``; serves the aggregate to Prometheus."""
