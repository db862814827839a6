// A Fastify app whose routes answer invalid input with AJV validation errors.
// Run: node app.js <port>   (listens on 127.0.0.1 only)
"use strict";

const fastify = require("fastify")({ logger: false });

// How an integrated app names its consumer for the proxy (error responses included).
fastify.addHook("onSend", async (request, reply, payload) => {
  const customer = request.headers["x-customer"];
  if (customer) {
    reply.header("X-Apitally-Consumer", customer);
  }
  return payload;
});

fastify.post(
  "/items",
  {
    schema: {
      body: {
        type: "object",
        required: ["name", "price"],
        properties: {
          name: { type: "string" },
          price: { type: "number" },
          address: {
            type: "object",
            properties: { city: { type: "string" } },
          },
        },
      },
    },
  },
  async (request) => ({ name: request.body.name }),
);

fastify.get(
  "/search",
  {
    schema: {
      querystring: {
        type: "object",
        required: ["limit"],
        properties: { limit: { type: "integer" } },
      },
    },
  },
  async (request) => ({ limit: request.query.limit }),
);

const port = Number(process.argv[2] || process.env.PORT || 3000);
fastify.listen({ host: "127.0.0.1", port }).catch((err) => {
  console.error(err);
  process.exit(1);
});
