-- Fees per model per day, in base units (1 OPEN = 10^18).
SELECT
  model_id,
  event_date AS day,
  count(*) AS fees,
  sum(amount) AS amount
FROM fee_charged
GROUP BY model_id, event_date
