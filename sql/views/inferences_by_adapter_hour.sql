-- Inferences per adapter (model id) per hour, with token counts and latency.
SELECT
  model_id,
  date_trunc('hour', event_time) AS hour,
  count(*) AS inferences,
  sum(prompt_tokens) AS prompt_tokens,
  sum(completion_tokens) AS completion_tokens,
  avg(latency_ms) AS avg_latency_ms
FROM inference_completed
GROUP BY model_id, date_trunc('hour', event_time)
