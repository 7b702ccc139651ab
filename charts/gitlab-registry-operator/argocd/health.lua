-- Argo CD health of VirtualRegistry, Upstream and CleanupPolicy (gitlabregistry.io).
-- Suspended on spec.suspend; Progressing until the operator has reported on the current
-- generation or while Ready waits on another object; Healthy on Ready=True; Degraded otherwise.
local waiting_reasons = {
  WaitingForRegistry = true,
  WaitingForUpstream = true,
  Pending = true,
}
local hs = {}
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: the operator sends nothing to GitLab"
  return hs
end
local status = obj.status
if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report conditions"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local ready = nil
for _, condition in ipairs(status.conditions) do
  if condition.type == "Ready" then
    ready = condition
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Ready of generation " .. tostring(generation)
  return hs
end
local message = ready.message or ""
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end
if ready.status == "Unknown" or waiting_reasons[ready.reason] then
  hs.status = "Progressing"
  hs.message = (ready.reason or "Unknown") .. ": " .. message
  return hs
end
hs.status = "Degraded"
hs.message = (ready.reason or "NotReady") .. ": " .. message
return hs
