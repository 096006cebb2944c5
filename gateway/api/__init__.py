"""The HTTP surface: the routes of every surface (`routes/`: OpenAI's `/v1`, PromptLoop's
`/v0`, PLai's, the dashboard, admin) and what wraps them — authentication, rate limits,
request limits, security headers, metrics, errors in OpenAI's envelope, the OpenAPI
document. Routes do not import each other: what two surfaces share lives in the gateway's
use-case modules (`intake`, `control`, `outputs`)."""
