// /docs: Swagger UI over the gateway's own OpenAPI document (no inline script: the CSP).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  deepLinking: true,
  validatorUrl: null,  // no badge fetched from validator.swagger.io
});
