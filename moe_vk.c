/* moe_vk.c — the Vulkan backend of moe.

   WHAT IT DOES
   Runs the op interface of moe.h's private section (embed, rmsnorm, matmul, rope, attention, add,
   moe_ffn, ...) as compute shaders. The forward pass in moe.c calls the ops between begin_step and
   end_step; here each op only appends dispatch records to the step. end_step turns the records
   into one command buffer (or replays a cached one when the records are identical, as they are
   for every decode step: positions and token ids live in a small host-visible "step" buffer, not
   in the commands), submits it once, waits, and leaves the logits in a host-visible buffer.

   MAP OF THIS FILE
   1. Vulkan declarations: the subset of the API this file uses (no Vulkan headers needed)
   2. loader: dlopen("libvulkan.so.1") and the function table (no global vk* symbols)
   3. backend: instance, validation messenger, device choice, features
   4. memory: buffers, batched uploads through staging, weight windows
   5. pipelines: built lazily from the embedded SPIR-V (shaders_embedded.c)
   6. contexts: activations, KV cache, scratch; step recording, barriers, submit, profiling
   7. ops: the op table (moe_vk_ops)

   WEIGHTS
   All weights live in device-local "windows": buffers no larger than maxStorageBufferRange (and
   maxMemoryAllocationSize). A tensor sits inside one window unless it is larger than a window,
   then it is split at row boundaries and each part is a separate dispatch. Dense kernels see
   their tensor at byte 0 of binding 6[0]. Expert tensors are addressed through a per-layer
   indirection table on the GPU (expert id -> window, byte offset; binding 3), with the windows
   of the layer bound as the array binding 6[0..7], so streaming can later change the table and
   never the kernels.

   ENVIRONMENT
   MOE_VK_VALIDATION=1   enable VK_LAYER_KHRONOS_validation; every message goes to the log
   MOE_VK_PROFILE=1      timestamp every dispatch; the context logs GPU time per kernel kind
                         when it is freed (serializes dispatches: use for attribution only)
   MOE_VK_NO_COOPMAT=1   do not use GL_NV_cooperative_matrix for prefill matmuls
   MOE_VK_SERIAL=1       a barrier between every two dispatches (debugging) */
#define _GNU_SOURCE
#define MOE_INTERNAL
#include "moe.h"

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ============================================================================================ */
/* 1. Vulkan declarations                                                                        */
/* ============================================================================================ */
/* The subset of vulkan_core.h (Khronos, Apache-2.0 OR MIT) that this file uses, so that it builds
   without the Vulkan SDK. Enums are plain int32_t, flag types VkFlags; layouts are identical. */
#if defined(_WIN32)
#define VKAPI_PTR __stdcall
#elif defined(__ARM_ARCH) && __ARM_ARCH < 7
#define VKAPI_PTR
#elif defined(__ARM_ARCH) && __ARM_ARCH >= 7 && defined(__ARM_32BIT_STATE)
#define VKAPI_PTR __attribute__((pcs("aapcs-vfp")))
#else
#define VKAPI_PTR
#endif
typedef uint32_t VkFlags;
typedef uint32_t VkBool32;
typedef uint64_t VkDeviceSize;
typedef int32_t VkEnum;
typedef int32_t VkResult;
#define VK_DISPATCHABLE(name) typedef struct name##_T *name
#if defined(__LP64__) || defined(_WIN64) || defined(__x86_64__) || defined(__aarch64__) || defined(__powerpc64__)
#define VK_NONDISPATCHABLE(name) typedef struct name##_T *name
#else
#define VK_NONDISPATCHABLE(name) typedef uint64_t name
#endif
VK_DISPATCHABLE(VkInstance);
VK_DISPATCHABLE(VkPhysicalDevice);
VK_DISPATCHABLE(VkDevice);
VK_DISPATCHABLE(VkQueue);
VK_DISPATCHABLE(VkCommandBuffer);
VK_NONDISPATCHABLE(VkBuffer);
VK_NONDISPATCHABLE(VkDeviceMemory);
VK_NONDISPATCHABLE(VkShaderModule);
VK_NONDISPATCHABLE(VkPipeline);
VK_NONDISPATCHABLE(VkPipelineLayout);
VK_NONDISPATCHABLE(VkPipelineCache);
VK_NONDISPATCHABLE(VkDescriptorSetLayout);
VK_NONDISPATCHABLE(VkDescriptorSet);
VK_NONDISPATCHABLE(VkCommandPool);
VK_NONDISPATCHABLE(VkFence);
VK_NONDISPATCHABLE(VkSemaphore);
VK_NONDISPATCHABLE(VkQueryPool);
VK_NONDISPATCHABLE(VkDebugUtilsMessengerEXT);

typedef void (VKAPI_PTR *PFN_vkVoidFunction)(void);
typedef PFN_vkVoidFunction (VKAPI_PTR *PFN_vkGetInstanceProcAddr)(VkInstance, const char *);
struct VkDebugUtilsMessengerCallbackDataEXT;
typedef VkBool32 (VKAPI_PTR *PFN_vkDebugUtilsMessengerCallbackEXT)(VkFlags severity, VkFlags types,
                                                                   const struct VkDebugUtilsMessengerCallbackDataEXT *data, void *user);

typedef struct VkApplicationInfo { VkEnum sType; const void *pNext; const char *pApplicationName; uint32_t applicationVersion; const char *pEngineName; uint32_t engineVersion, apiVersion; } VkApplicationInfo;
typedef struct VkInstanceCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; const VkApplicationInfo *pApplicationInfo; uint32_t enabledLayerCount; const char* const *ppEnabledLayerNames; uint32_t enabledExtensionCount; const char* const *ppEnabledExtensionNames; } VkInstanceCreateInfo;
typedef struct VkLayerProperties { char layerName[256]; uint32_t specVersion, implementationVersion; char description[256]; } VkLayerProperties;
typedef struct VkExtensionProperties { char extensionName[256]; uint32_t specVersion; } VkExtensionProperties;
typedef struct VkPhysicalDeviceLimits { uint32_t maxImageDimension1D, maxImageDimension2D, maxImageDimension3D, maxImageDimensionCube, maxImageArrayLayers, maxTexelBufferElements, maxUniformBufferRange, maxStorageBufferRange, maxPushConstantsSize, maxMemoryAllocationCount, maxSamplerAllocationCount; VkDeviceSize bufferImageGranularity, sparseAddressSpaceSize; uint32_t maxBoundDescriptorSets, maxPerStageDescriptorSamplers, maxPerStageDescriptorUniformBuffers, maxPerStageDescriptorStorageBuffers, maxPerStageDescriptorSampledImages, maxPerStageDescriptorStorageImages, maxPerStageDescriptorInputAttachments, maxPerStageResources, maxDescriptorSetSamplers, maxDescriptorSetUniformBuffers, maxDescriptorSetUniformBuffersDynamic, maxDescriptorSetStorageBuffers, maxDescriptorSetStorageBuffersDynamic, maxDescriptorSetSampledImages, maxDescriptorSetStorageImages, maxDescriptorSetInputAttachments, maxVertexInputAttributes, maxVertexInputBindings, maxVertexInputAttributeOffset, maxVertexInputBindingStride, maxVertexOutputComponents, maxTessellationGenerationLevel, maxTessellationPatchSize, maxTessellationControlPerVertexInputComponents, maxTessellationControlPerVertexOutputComponents, maxTessellationControlPerPatchOutputComponents, maxTessellationControlTotalOutputComponents, maxTessellationEvaluationInputComponents, maxTessellationEvaluationOutputComponents, maxGeometryShaderInvocations, maxGeometryInputComponents, maxGeometryOutputComponents, maxGeometryOutputVertices, maxGeometryTotalOutputComponents, maxFragmentInputComponents, maxFragmentOutputAttachments, maxFragmentDualSrcAttachments, maxFragmentCombinedOutputResources, maxComputeSharedMemorySize, maxComputeWorkGroupCount[3], maxComputeWorkGroupInvocations, maxComputeWorkGroupSize[3], subPixelPrecisionBits, subTexelPrecisionBits, mipmapPrecisionBits, maxDrawIndexedIndexValue, maxDrawIndirectCount; float maxSamplerLodBias, maxSamplerAnisotropy; uint32_t maxViewports, maxViewportDimensions[2]; float viewportBoundsRange[2]; uint32_t viewportSubPixelBits; size_t minMemoryMapAlignment; VkDeviceSize minTexelBufferOffsetAlignment, minUniformBufferOffsetAlignment, minStorageBufferOffsetAlignment; int32_t minTexelOffset; uint32_t maxTexelOffset; int32_t minTexelGatherOffset; uint32_t maxTexelGatherOffset; float minInterpolationOffset, maxInterpolationOffset; uint32_t subPixelInterpolationOffsetBits, maxFramebufferWidth, maxFramebufferHeight, maxFramebufferLayers; VkFlags framebufferColorSampleCounts, framebufferDepthSampleCounts, framebufferStencilSampleCounts, framebufferNoAttachmentsSampleCounts; uint32_t maxColorAttachments; VkFlags sampledImageColorSampleCounts, sampledImageIntegerSampleCounts, sampledImageDepthSampleCounts, sampledImageStencilSampleCounts, storageImageSampleCounts; uint32_t maxSampleMaskWords; VkBool32 timestampComputeAndGraphics; float timestampPeriod; uint32_t maxClipDistances, maxCullDistances, maxCombinedClipAndCullDistances, discreteQueuePriorities; float pointSizeRange[2], lineWidthRange[2], pointSizeGranularity, lineWidthGranularity; VkBool32 strictLines, standardSampleLocations; VkDeviceSize optimalBufferCopyOffsetAlignment, optimalBufferCopyRowPitchAlignment, nonCoherentAtomSize; } VkPhysicalDeviceLimits;
typedef struct VkPhysicalDeviceSparseProperties { VkBool32 residencyStandard2DBlockShape, residencyStandard2DMultisampleBlockShape, residencyStandard3DBlockShape, residencyAlignedMipSize, residencyNonResidentStrict; } VkPhysicalDeviceSparseProperties;
typedef struct VkPhysicalDeviceProperties { uint32_t apiVersion, driverVersion, vendorID, deviceID; VkEnum deviceType; char deviceName[256]; uint8_t pipelineCacheUUID[16]; VkPhysicalDeviceLimits limits; VkPhysicalDeviceSparseProperties sparseProperties; } VkPhysicalDeviceProperties;
typedef struct VkPhysicalDeviceProperties2 { VkEnum sType; void *pNext; VkPhysicalDeviceProperties properties; } VkPhysicalDeviceProperties2;
typedef struct VkPhysicalDeviceSubgroupProperties { VkEnum sType; void *pNext; uint32_t subgroupSize; VkFlags supportedStages, supportedOperations; VkBool32 quadOperationsInAllStages; } VkPhysicalDeviceSubgroupProperties;
typedef struct VkPhysicalDevicePushDescriptorPropertiesKHR { VkEnum sType; void *pNext; uint32_t maxPushDescriptors; } VkPhysicalDevicePushDescriptorPropertiesKHR;
typedef struct VkPhysicalDeviceMaintenance3Properties { VkEnum sType; void *pNext; uint32_t maxPerSetDescriptors; VkDeviceSize maxMemoryAllocationSize; } VkPhysicalDeviceMaintenance3Properties;
typedef struct VkPhysicalDeviceFeatures { VkBool32 robustBufferAccess, fullDrawIndexUint32, imageCubeArray, independentBlend, geometryShader, tessellationShader, sampleRateShading, dualSrcBlend, logicOp, multiDrawIndirect, drawIndirectFirstInstance, depthClamp, depthBiasClamp, fillModeNonSolid, depthBounds, wideLines, largePoints, alphaToOne, multiViewport, samplerAnisotropy, textureCompressionETC2, textureCompressionASTC_LDR, textureCompressionBC, occlusionQueryPrecise, pipelineStatisticsQuery, vertexPipelineStoresAndAtomics, fragmentStoresAndAtomics, shaderTessellationAndGeometryPointSize, shaderImageGatherExtended, shaderStorageImageExtendedFormats, shaderStorageImageMultisample, shaderStorageImageReadWithoutFormat, shaderStorageImageWriteWithoutFormat, shaderUniformBufferArrayDynamicIndexing, shaderSampledImageArrayDynamicIndexing, shaderStorageBufferArrayDynamicIndexing, shaderStorageImageArrayDynamicIndexing, shaderClipDistance, shaderCullDistance, shaderFloat64, shaderInt64, shaderInt16, shaderResourceResidency, shaderResourceMinLod, sparseBinding, sparseResidencyBuffer, sparseResidencyImage2D, sparseResidencyImage3D, sparseResidency2Samples, sparseResidency4Samples, sparseResidency8Samples, sparseResidency16Samples, sparseResidencyAliased, variableMultisampleRate, inheritedQueries; } VkPhysicalDeviceFeatures;
typedef struct VkPhysicalDeviceFeatures2 { VkEnum sType; void *pNext; VkPhysicalDeviceFeatures features; } VkPhysicalDeviceFeatures2;
typedef struct VkPhysicalDeviceShaderFloat16Int8Features { VkEnum sType; void *pNext; VkBool32 shaderFloat16, shaderInt8; } VkPhysicalDeviceShaderFloat16Int8Features;
typedef struct VkPhysicalDeviceVulkanMemoryModelFeatures { VkEnum sType; void *pNext; VkBool32 vulkanMemoryModel, vulkanMemoryModelDeviceScope, vulkanMemoryModelAvailabilityVisibilityChains; } VkPhysicalDeviceVulkanMemoryModelFeatures;
typedef struct VkPhysicalDeviceCooperativeMatrixFeaturesNV { VkEnum sType; void *pNext; VkBool32 cooperativeMatrix, cooperativeMatrixRobustBufferAccess; } VkPhysicalDeviceCooperativeMatrixFeaturesNV;
typedef struct VkCooperativeMatrixPropertiesNV { VkEnum sType; void *pNext; uint32_t MSize, NSize, KSize; VkEnum AType, BType, CType, DType, scope; } VkCooperativeMatrixPropertiesNV;
typedef struct VkExtent3D { uint32_t width, height, depth; } VkExtent3D;
typedef struct VkQueueFamilyProperties { VkFlags queueFlags; uint32_t queueCount, timestampValidBits; VkExtent3D minImageTransferGranularity; } VkQueueFamilyProperties;
typedef struct VkMemoryType { VkFlags propertyFlags; uint32_t heapIndex; } VkMemoryType;
typedef struct VkMemoryHeap { VkDeviceSize size; VkFlags flags; } VkMemoryHeap;
typedef struct VkPhysicalDeviceMemoryProperties { uint32_t memoryTypeCount; VkMemoryType memoryTypes[32]; uint32_t memoryHeapCount; VkMemoryHeap memoryHeaps[16]; } VkPhysicalDeviceMemoryProperties;
typedef struct VkDeviceQueueCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t queueFamilyIndex, queueCount; const float *pQueuePriorities; } VkDeviceQueueCreateInfo;
typedef struct VkDeviceCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t queueCreateInfoCount; const VkDeviceQueueCreateInfo *pQueueCreateInfos; uint32_t enabledLayerCount; const char* const *ppEnabledLayerNames; uint32_t enabledExtensionCount; const char* const *ppEnabledExtensionNames; const VkPhysicalDeviceFeatures *pEnabledFeatures; } VkDeviceCreateInfo;
typedef struct VkBufferCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkDeviceSize size; VkFlags usage; VkEnum sharingMode; uint32_t queueFamilyIndexCount; const uint32_t *pQueueFamilyIndices; } VkBufferCreateInfo;
typedef struct VkMemoryRequirements { VkDeviceSize size, alignment; uint32_t memoryTypeBits; } VkMemoryRequirements;
typedef struct VkMemoryAllocateInfo { VkEnum sType; const void *pNext; VkDeviceSize allocationSize; uint32_t memoryTypeIndex; } VkMemoryAllocateInfo;
typedef struct VkShaderModuleCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; size_t codeSize; const uint32_t *pCode; } VkShaderModuleCreateInfo;
typedef struct VkDescriptorSetLayoutBinding { uint32_t binding; VkEnum descriptorType; uint32_t descriptorCount; VkFlags stageFlags; const void *pImmutableSamplers; } VkDescriptorSetLayoutBinding;
typedef struct VkDescriptorSetLayoutCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t bindingCount; const VkDescriptorSetLayoutBinding *pBindings; } VkDescriptorSetLayoutCreateInfo;
typedef struct VkPushConstantRange { VkFlags stageFlags; uint32_t offset, size; } VkPushConstantRange;
typedef struct VkPipelineLayoutCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t setLayoutCount; const VkDescriptorSetLayout *pSetLayouts; uint32_t pushConstantRangeCount; const VkPushConstantRange *pPushConstantRanges; } VkPipelineLayoutCreateInfo;
typedef struct VkSpecializationMapEntry { uint32_t constantID, offset; size_t size; } VkSpecializationMapEntry;
typedef struct VkSpecializationInfo { uint32_t mapEntryCount; const VkSpecializationMapEntry *pMapEntries; size_t dataSize; const void *pData; } VkSpecializationInfo;
typedef struct VkPipelineShaderStageCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkEnum stage; VkShaderModule module; const char *pName; const VkSpecializationInfo *pSpecializationInfo; } VkPipelineShaderStageCreateInfo;
typedef struct VkComputePipelineCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkPipelineShaderStageCreateInfo stage; VkPipelineLayout layout; VkPipeline basePipelineHandle; int32_t basePipelineIndex; } VkComputePipelineCreateInfo;
typedef struct VkCommandPoolCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t queueFamilyIndex; } VkCommandPoolCreateInfo;
typedef struct VkCommandBufferAllocateInfo { VkEnum sType; const void *pNext; VkCommandPool commandPool; VkEnum level; uint32_t commandBufferCount; } VkCommandBufferAllocateInfo;
typedef struct VkCommandBufferBeginInfo { VkEnum sType; const void *pNext; VkFlags flags; const void *pInheritanceInfo; } VkCommandBufferBeginInfo;
typedef struct VkDescriptorBufferInfo { VkBuffer buffer; VkDeviceSize offset, range; } VkDescriptorBufferInfo;
typedef struct VkWriteDescriptorSet { VkEnum sType; const void *pNext; VkDescriptorSet dstSet; uint32_t dstBinding, dstArrayElement, descriptorCount; VkEnum descriptorType; const void *pImageInfo; const VkDescriptorBufferInfo *pBufferInfo; const void *pTexelBufferView; } VkWriteDescriptorSet;
typedef struct VkMemoryBarrier { VkEnum sType; const void *pNext; VkFlags srcAccessMask, dstAccessMask; } VkMemoryBarrier;
typedef struct VkBufferCopy { VkDeviceSize srcOffset, dstOffset, size; } VkBufferCopy;
typedef struct VkSubmitInfo { VkEnum sType; const void *pNext; uint32_t waitSemaphoreCount; const VkSemaphore *pWaitSemaphores; const VkFlags *pWaitDstStageMask; uint32_t commandBufferCount; const VkCommandBuffer *pCommandBuffers; uint32_t signalSemaphoreCount; const VkSemaphore *pSignalSemaphores; } VkSubmitInfo;
typedef struct VkFenceCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; } VkFenceCreateInfo;
typedef struct VkQueryPoolCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkEnum queryType; uint32_t queryCount; VkFlags pipelineStatistics; } VkQueryPoolCreateInfo;
typedef struct VkDebugUtilsMessengerCreateInfoEXT { VkEnum sType; const void *pNext; VkFlags flags, messageSeverity, messageType; PFN_vkDebugUtilsMessengerCallbackEXT pfnUserCallback; void *pUserData; } VkDebugUtilsMessengerCreateInfoEXT;
typedef struct VkDebugUtilsMessengerCallbackDataEXT { VkEnum sType; const void *pNext; VkFlags flags; const char *pMessageIdName; int32_t messageIdNumber; const char *pMessage; uint32_t queueLabelCount; const void *pQueueLabels; uint32_t cmdBufLabelCount; const void *pCmdBufLabels; uint32_t objectCount; const void *pObjects; } VkDebugUtilsMessengerCallbackDataEXT;
/* end of the Vulkan struct subset */

enum { /* VkStructureType values */
    VK_STRUCTURE_TYPE_APPLICATION_INFO = 0, VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO = 1,
    VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO = 2, VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO = 3,
    VK_STRUCTURE_TYPE_SUBMIT_INFO = 4, VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO = 5,
    VK_STRUCTURE_TYPE_FENCE_CREATE_INFO = 8, VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO = 11,
    VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO = 12, VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO = 16,
    VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO = 18, VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO = 29,
    VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO = 30, VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO = 32,
    VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET = 35, VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO = 39,
    VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO = 40, VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO = 42,
    VK_STRUCTURE_TYPE_MEMORY_BARRIER = 46,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2 = 1000059000, VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2 = 1000059001,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PUSH_DESCRIPTOR_PROPERTIES_KHR = 1000080000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES = 1000082000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES = 1000094000,
    VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT = 1000128004,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES = 1000168000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES = 1000211000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV = 1000249000,
    VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV = 1000249001,
};
#define VK_SUCCESS 0
#define VK_TIMEOUT 2
#define VK_INCOMPLETE 5
#define VK_ERROR_OUT_OF_HOST_MEMORY (-1)
#define VK_ERROR_OUT_OF_DEVICE_MEMORY (-2)
#define VK_ERROR_DEVICE_LOST (-4)
#define VK_API_VERSION_1_2 ((1u << 22) | (2u << 12))
#define VK_VERSION_MAJOR(v) ((uint32_t)(v) >> 22)
#define VK_VERSION_MINOR(v) (((uint32_t)(v) >> 12) & 0x3ffu)
#define VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU 1
#define VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU 2
#define VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU 3
#define VK_PHYSICAL_DEVICE_TYPE_CPU 4
#define VK_QUEUE_GRAPHICS_BIT 0x1u
#define VK_QUEUE_COMPUTE_BIT 0x2u
#define VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT 0x1u
#define VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT 0x2u
#define VK_MEMORY_PROPERTY_HOST_COHERENT_BIT 0x4u
#define VK_MEMORY_PROPERTY_HOST_CACHED_BIT 0x8u
#define VK_MEMORY_HEAP_DEVICE_LOCAL_BIT 0x1u
#define VK_BUFFER_USAGE_TRANSFER_SRC_BIT 0x1u
#define VK_BUFFER_USAGE_TRANSFER_DST_BIT 0x2u
#define VK_BUFFER_USAGE_STORAGE_BUFFER_BIT 0x20u
#define VK_SHARING_MODE_EXCLUSIVE 0
#define VK_DESCRIPTOR_TYPE_STORAGE_BUFFER 7
#define VK_DESCRIPTOR_SET_LAYOUT_CREATE_PUSH_DESCRIPTOR_BIT_KHR 0x1u
#define VK_SHADER_STAGE_COMPUTE_BIT 0x20u
#define VK_PIPELINE_BIND_POINT_COMPUTE 1
#define VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT 0x2u
#define VK_COMMAND_BUFFER_LEVEL_PRIMARY 0
#define VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT 0x1u
#define VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT 0x1u
#define VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT 0x800u
#define VK_PIPELINE_STAGE_TRANSFER_BIT 0x1000u
#define VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT 0x2000u
#define VK_PIPELINE_STAGE_HOST_BIT 0x4000u
#define VK_ACCESS_SHADER_READ_BIT 0x20u
#define VK_ACCESS_SHADER_WRITE_BIT 0x40u
#define VK_ACCESS_TRANSFER_READ_BIT 0x800u
#define VK_ACCESS_TRANSFER_WRITE_BIT 0x1000u
#define VK_ACCESS_HOST_READ_BIT 0x2000u
#define VK_ACCESS_HOST_WRITE_BIT 0x4000u
#define VK_QUERY_TYPE_TIMESTAMP 2
#define VK_QUERY_RESULT_64_BIT 0x1u
#define VK_QUERY_RESULT_WAIT_BIT 0x2u
#define VK_SUBGROUP_FEATURE_BASIC_BIT 0x1u
#define VK_SUBGROUP_FEATURE_ARITHMETIC_BIT 0x4u
#define VK_COMPONENT_TYPE_FLOAT16_NV 0
#define VK_COMPONENT_TYPE_FLOAT32_NV 1
#define VK_SCOPE_SUBGROUP_NV 3
#define VK_DEBUG_UTILS_MESSAGE_SEVERITY_INFO_BIT_EXT 0x10u
#define VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT 0x100u
#define VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT 0x1000u
#define VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT 0x1u
#define VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT 0x2u
#define VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT 0x4u
#define VK_WHOLE_SIZE (~0ull)

/* ============================================================================================ */
/* 2. loader                                                                                     */
/* ============================================================================================ */
/* Every entry point this file calls, as (return type, name without "vk", parameters). They live in
   the backend's function table (vk_fns): nothing named vk* is defined or imported globally. */
#define VK_GLOBAL_FNS(X)                                                                                         \
    X(VkResult, CreateInstance, (const VkInstanceCreateInfo *, const void *, VkInstance *))                       \
    X(VkResult, EnumerateInstanceLayerProperties, (uint32_t *, VkLayerProperties *))                             \
    X(VkResult, EnumerateInstanceExtensionProperties, (const char *, uint32_t *, VkExtensionProperties *))

#define VK_INSTANCE_FNS(X)                                                                                       \
    X(void, DestroyInstance, (VkInstance, const void *))                                                         \
    X(VkResult, EnumeratePhysicalDevices, (VkInstance, uint32_t *, VkPhysicalDevice *))                          \
    X(void, GetPhysicalDeviceProperties, (VkPhysicalDevice, VkPhysicalDeviceProperties *))                       \
    X(void, GetPhysicalDeviceProperties2, (VkPhysicalDevice, VkPhysicalDeviceProperties2 *))                     \
    X(void, GetPhysicalDeviceFeatures2, (VkPhysicalDevice, VkPhysicalDeviceFeatures2 *))                         \
    X(void, GetPhysicalDeviceQueueFamilyProperties, (VkPhysicalDevice, uint32_t *, VkQueueFamilyProperties *))   \
    X(void, GetPhysicalDeviceMemoryProperties, (VkPhysicalDevice, VkPhysicalDeviceMemoryProperties *))           \
    X(VkResult, EnumerateDeviceExtensionProperties, (VkPhysicalDevice, const char *, uint32_t *, VkExtensionProperties *)) \
    X(VkResult, CreateDevice, (VkPhysicalDevice, const VkDeviceCreateInfo *, const void *, VkDevice *))          \
    X(PFN_vkVoidFunction, GetDeviceProcAddr, (VkDevice, const char *))

#define VK_DEVICE_FNS(X)                                                                                         \
    X(void, DestroyDevice, (VkDevice, const void *))                                                             \
    X(void, GetDeviceQueue, (VkDevice, uint32_t, uint32_t, VkQueue *))                                           \
    X(VkResult, CreateBuffer, (VkDevice, const VkBufferCreateInfo *, const void *, VkBuffer *))                  \
    X(void, DestroyBuffer, (VkDevice, VkBuffer, const void *))                                                   \
    X(void, GetBufferMemoryRequirements, (VkDevice, VkBuffer, VkMemoryRequirements *))                          \
    X(VkResult, AllocateMemory, (VkDevice, const VkMemoryAllocateInfo *, const void *, VkDeviceMemory *))        \
    X(void, FreeMemory, (VkDevice, VkDeviceMemory, const void *))                                                \
    X(VkResult, BindBufferMemory, (VkDevice, VkBuffer, VkDeviceMemory, VkDeviceSize))                           \
    X(VkResult, MapMemory, (VkDevice, VkDeviceMemory, VkDeviceSize, VkDeviceSize, VkFlags, void **))             \
    X(VkResult, CreateShaderModule, (VkDevice, const VkShaderModuleCreateInfo *, const void *, VkShaderModule *)) \
    X(void, DestroyShaderModule, (VkDevice, VkShaderModule, const void *))                                       \
    X(VkResult, CreateDescriptorSetLayout, (VkDevice, const VkDescriptorSetLayoutCreateInfo *, const void *, VkDescriptorSetLayout *)) \
    X(void, DestroyDescriptorSetLayout, (VkDevice, VkDescriptorSetLayout, const void *))                         \
    X(VkResult, CreatePipelineLayout, (VkDevice, const VkPipelineLayoutCreateInfo *, const void *, VkPipelineLayout *)) \
    X(void, DestroyPipelineLayout, (VkDevice, VkPipelineLayout, const void *))                                   \
    X(VkResult, CreateComputePipelines, (VkDevice, VkPipelineCache, uint32_t, const VkComputePipelineCreateInfo *, const void *, VkPipeline *)) \
    X(void, DestroyPipeline, (VkDevice, VkPipeline, const void *))                                               \
    X(VkResult, CreateCommandPool, (VkDevice, const VkCommandPoolCreateInfo *, const void *, VkCommandPool *))   \
    X(void, DestroyCommandPool, (VkDevice, VkCommandPool, const void *))                                         \
    X(VkResult, AllocateCommandBuffers, (VkDevice, const VkCommandBufferAllocateInfo *, VkCommandBuffer *))      \
    X(VkResult, BeginCommandBuffer, (VkCommandBuffer, const VkCommandBufferBeginInfo *))                         \
    X(VkResult, EndCommandBuffer, (VkCommandBuffer))                                                             \
    X(VkResult, ResetCommandBuffer, (VkCommandBuffer, VkFlags))                                                  \
    X(void, CmdBindPipeline, (VkCommandBuffer, VkEnum, VkPipeline))                                              \
    X(void, CmdPushConstants, (VkCommandBuffer, VkPipelineLayout, VkFlags, uint32_t, uint32_t, const void *))    \
    X(void, CmdDispatch, (VkCommandBuffer, uint32_t, uint32_t, uint32_t))                                        \
    X(void, CmdPipelineBarrier, (VkCommandBuffer, VkFlags, VkFlags, VkFlags, uint32_t, const VkMemoryBarrier *, uint32_t, const void *, uint32_t, const void *)) \
    X(void, CmdCopyBuffer, (VkCommandBuffer, VkBuffer, VkBuffer, uint32_t, const VkBufferCopy *))                \
    X(void, CmdFillBuffer, (VkCommandBuffer, VkBuffer, VkDeviceSize, VkDeviceSize, uint32_t))                    \
    X(void, CmdResetQueryPool, (VkCommandBuffer, VkQueryPool, uint32_t, uint32_t))                               \
    X(void, CmdWriteTimestamp, (VkCommandBuffer, VkFlags, VkQueryPool, uint32_t))                                \
    X(VkResult, CreateQueryPool, (VkDevice, const VkQueryPoolCreateInfo *, const void *, VkQueryPool *))         \
    X(void, DestroyQueryPool, (VkDevice, VkQueryPool, const void *))                                             \
    X(VkResult, GetQueryPoolResults, (VkDevice, VkQueryPool, uint32_t, uint32_t, size_t, void *, VkDeviceSize, VkFlags)) \
    X(VkResult, QueueSubmit, (VkQueue, uint32_t, const VkSubmitInfo *, VkFence))                                 \
    X(VkResult, CreateFence, (VkDevice, const VkFenceCreateInfo *, const void *, VkFence *))                     \
    X(void, DestroyFence, (VkDevice, VkFence, const void *))                                                     \
    X(VkResult, WaitForFences, (VkDevice, uint32_t, const VkFence *, VkBool32, uint64_t))                        \
    X(VkResult, ResetFences, (VkDevice, uint32_t, const VkFence *))                                              \
    X(VkResult, DeviceWaitIdle, (VkDevice))                                                                      \
    X(void, CmdPushDescriptorSetKHR, (VkCommandBuffer, VkEnum, VkPipelineLayout, uint32_t, uint32_t, const VkWriteDescriptorSet *))

/* optional entry points: NULL when absent */
#define VK_OPTIONAL_INSTANCE_FNS(X)                                                                              \
    X(VkResult, CreateDebugUtilsMessengerEXT, (VkInstance, const VkDebugUtilsMessengerCreateInfoEXT *, const void *, VkDebugUtilsMessengerEXT *)) \
    X(void, DestroyDebugUtilsMessengerEXT, (VkInstance, VkDebugUtilsMessengerEXT, const void *))                 \
    X(VkResult, GetPhysicalDeviceCooperativeMatrixPropertiesNV, (VkPhysicalDevice, uint32_t *, VkCooperativeMatrixPropertiesNV *))

typedef struct vk_fns {
    PFN_vkGetInstanceProcAddr GetInstanceProcAddr;
#define VK_FN_FIELD(ret, name, args) ret (VKAPI_PTR *name) args;
    VK_GLOBAL_FNS(VK_FN_FIELD)
    VK_INSTANCE_FNS(VK_FN_FIELD)
    VK_OPTIONAL_INSTANCE_FNS(VK_FN_FIELD)
    VK_DEVICE_FNS(VK_FN_FIELD)
#undef VK_FN_FIELD
} vk_fns;

/* an entry point into a typed slot of the table (function pointers convert through memcpy, which
   is what POSIX dlsym users do anyway) */
static int vk_fn_store(void *slot, PFN_vkVoidFunction fn) {
    memcpy(slot, &fn, sizeof fn);
    return fn != NULL;
}

/* Opens the loader and fills the global entry points. Returns NULL on success or what is missing. */
static const char *vk_load_global(vk_fns *f, void **lib_out) {
    static const char *const names[] = {"libvulkan.so.1", "libvulkan.so"};
    void *lib = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !lib; i++) lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) return "the Vulkan loader libvulkan.so.1 was not found (Debian: apt-get install libvulkan1)";
    void *sym = dlsym(lib, "vkGetInstanceProcAddr");
    if (!sym) {
        dlclose(lib);
        return "libvulkan.so.1 has no vkGetInstanceProcAddr";
    }
    memcpy(&f->GetInstanceProcAddr, &sym, sizeof sym);
#define VK_LOAD_GLOBAL(ret, name, args)                                                                          \
    if (!vk_fn_store(&f->name, f->GetInstanceProcAddr(NULL, "vk" #name))) {                                      \
        dlclose(lib);                                                                                            \
        return "the Vulkan loader lacks vk" #name;                                                               \
    }
    VK_GLOBAL_FNS(VK_LOAD_GLOBAL)
#undef VK_LOAD_GLOBAL
    *lib_out = lib;
    return NULL;
}

static const char *vk_load_instance(vk_fns *f, VkInstance inst) {
#define VK_LOAD_INST(ret, name, args)                                                                            \
    if (!vk_fn_store(&f->name, f->GetInstanceProcAddr(inst, "vk" #name))) return "vk" #name;
    VK_INSTANCE_FNS(VK_LOAD_INST)
#undef VK_LOAD_INST
#define VK_LOAD_OPT(ret, name, args) vk_fn_store(&f->name, f->GetInstanceProcAddr(inst, "vk" #name));
    VK_OPTIONAL_INSTANCE_FNS(VK_LOAD_OPT)
#undef VK_LOAD_OPT
    return NULL;
}

static const char *vk_load_device(vk_fns *f, VkDevice dev) {
#define VK_LOAD_DEV(ret, name, args)                                                                             \
    if (!vk_fn_store(&f->name, f->GetDeviceProcAddr(dev, "vk" #name))) return "vk" #name;
    VK_DEVICE_FNS(VK_LOAD_DEV)
#undef VK_LOAD_DEV
    return NULL;
}

static const char *vk_result_str(VkResult r) {
    switch (r) {
    case VK_SUCCESS: return "VK_SUCCESS";
    case VK_TIMEOUT: return "VK_TIMEOUT";
    case VK_ERROR_OUT_OF_HOST_MEMORY: return "VK_ERROR_OUT_OF_HOST_MEMORY";
    case VK_ERROR_OUT_OF_DEVICE_MEMORY: return "VK_ERROR_OUT_OF_DEVICE_MEMORY";
    case -3: return "VK_ERROR_INITIALIZATION_FAILED";
    case VK_ERROR_DEVICE_LOST: return "VK_ERROR_DEVICE_LOST";
    case -5: return "VK_ERROR_MEMORY_MAP_FAILED";
    case -6: return "VK_ERROR_LAYER_NOT_PRESENT";
    case -7: return "VK_ERROR_EXTENSION_NOT_PRESENT";
    case -8: return "VK_ERROR_FEATURE_NOT_PRESENT";
    case -9: return "VK_ERROR_INCOMPATIBLE_DRIVER";
    case -10: return "VK_ERROR_TOO_MANY_OBJECTS";
    case -13: return "VK_ERROR_UNKNOWN";
    default: return "VkResult error";
    }
}

/* ============================================================================================ */
/* 3. backend: instance, device, features                                                        */
/* ============================================================================================ */
#define VK_XBUFS 8            /* weight windows bound per dispatch: binding 6[0..7] (common.glsl XBUFS) */
#define VK_ALIGN 256          /* placement alignment of tensors and bindings (>= any min offset alignment) */
#define VK_PAD 16             /* readable slack after every tensor (dequant.glsl reads up to 16 bytes on) */
#define VK_MAX_EXPERTS 512    /* route.glsl MAX_EXPERTS */
#define VK_MAX_TOPK 32        /* route.glsl MAX_TOPK */
#define VK_MAX_ROPES 4        /* distinct rope settings among a model's layers */
#define VK_VARIANTS 4         /* pipelines per kernel: values of specialization constant 1 (head size) */

/* kernels: typed ones exist per weight type, in this order of types */
enum { VKT_F32, VKT_F16, VKT_BF16, VKT_Q8_0, VKT_Q4_0, VKT_Q4_K, VKT_Q5_K, VKT_Q6_K, VKT_MXFP4, VKT_COUNT };
static const char *const k_vk_type_names[VKT_COUNT] = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "mxfp4"};
enum { VKK_EMBED, VKK_MV, VKK_MM, VKK_MMG, VKK_MMCM, VKK_MMCMG, VKK_COUNT };
static const char *const k_vk_kind_names[VKK_COUNT] = {"embed", "mv", "mm", "mmg", "mmcm", "mmcmg"};
static const uint32_t k_vk_kind_wg[VKK_COUNT] = {64, 64, 256, 256, 128, 128};
enum {
    VKP_ADD = VKK_COUNT * VKT_COUNT, VKP_ATTN_F16, VKP_ATTN_F32, VKP_HEADWISE_F16, VKP_HEADWISE_F32, VKP_KVSTORE_F16,
    VKP_KVSTORE_F32, VKP_MOE_COMBINE, VKP_MOE_SORT, VKP_RMSNORM, VKP_TOPK, VKP_COUNT
};
static const struct { const char *name; uint32_t wg; } k_vk_plain[VKP_COUNT - VKP_ADD] = {
    {"add", 256}, {"attn_f16", 128}, {"attn_f32", 128}, {"headwise_f16", 64}, {"headwise_f32", 64},
    {"kvstore_f16", 64}, {"kvstore_f32", 64}, {"moe_combine", 256}, {"moe_sort", 256}, {"rmsnorm", 256}, {"topk", 64},
};
#define VKP_TYPED(kind, t) ((kind) * VKT_COUNT + (t))

static int vk_type_index(int32_t type) {
    switch (type) {
    case MOE_TYPE_F32: return VKT_F32;
    case MOE_TYPE_F16: return VKT_F16;
    case MOE_TYPE_BF16: return VKT_BF16;
    case MOE_TYPE_Q8_0: return VKT_Q8_0;
    case MOE_TYPE_Q4_0: return VKT_Q4_0;
    case MOE_TYPE_Q4_K: return VKT_Q4_K;
    case MOE_TYPE_Q5_K: return VKT_Q5_K;
    case MOE_TYPE_Q6_K: return VKT_Q6_K;
    case MOE_TYPE_MXFP4: return VKT_MXFP4;
    default: return -1;
    }
}

typedef struct vk_buf {
    VkBuffer buf;
    VkDeviceMemory mem;
    VkDeviceSize size;
    uint8_t *map;              /* host-visible buffers stay mapped */
} vk_buf;

/* Where a weight lives: parts (one unless the tensor is larger than a window) of rows
   [row_lo, row_hi) at (window, byte offset); expert tensors: a slice of the expert tables. */
typedef struct vk_part { uint32_t win; VkDeviceSize off, bytes; int64_t row_lo, row_hi; } vk_part;
typedef struct vk_wt {
    uint32_t part0, n_parts;   /* dense: parts[part0 ..] */
    uint32_t tbl, win0;        /* experts: table entries [tbl, tbl + n_expert), windows win0 .. win0+7 */
    int experts;
} vk_wt;

struct moe_vk_backend {
    vk_fns f;
    void *lib;
    VkInstance inst;
    VkDebugUtilsMessengerEXT messenger;
    VkPhysicalDevice pd;
    VkDevice dev;
    VkQueue queue;
    uint32_t qfam;
    VkPhysicalDeviceProperties props;
    VkPhysicalDeviceMemoryProperties memp;
    uint32_t subgroup;
    int coopmat, timestamps, validation;
    double ts_ns;              /* nanoseconds per timestamp tick */
    uint64_t ts_mask;
    VkDeviceSize win_cap;      /* bytes a weight window may hold */
    VkDescriptorSetLayout dsl;
    VkPipelineLayout layout;
    VkPipeline pipes[VKP_COUNT][VK_VARIANTS];  /* per kernel, per value of specialization constant 1 */
    uint32_t pipe_spec[VKP_COUNT][VK_VARIANTS];
    pthread_mutex_t lock;      /* lazy pipeline creation and queue submission */
    int lock_ok;
    vk_buf *win;               /* weight windows */
    uint32_t n_win;
    vk_buf tables, dummy;      /* expert tables [layer][gate, up, down][expert] uvec2; a 256-byte filler */
    vk_part *parts;
    uint32_t n_parts;
    vk_wt *wts;
    uint32_t n_wts;
    const moe_weights *w;
    moe_log_fn log;
    void *log_user;
    uint64_t weight_bytes;
};

static _Atomic long g_vk_validation_messages; /* warnings and errors reported by the validation layer */

static void vk_log(const moe_vk_backend *vk, int32_t level, const char *fmt, ...) {
    if (!vk || !vk->log) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    vk->log(level, buf, vk->log_user);
}

static VkBool32 VKAPI_PTR vk_messenger_cb(VkFlags severity, VkFlags types, const VkDebugUtilsMessengerCallbackDataEXT *data,
                                          void *user) {
    const moe_vk_backend *vk = user;
    int bad = (severity & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)) != 0;
    if (bad) g_vk_validation_messages++;
    if (bad || (types & VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT))
        vk_log(vk, (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) ? MOE_LOG_ERROR : bad ? MOE_LOG_WARN : MOE_LOG_DEBUG,
               "vulkan validation: %s", data && data->pMessage ? data->pMessage : "(no message)");
    return 0;
}

static int vk_env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static moe_status vk_fail(moe_status st, const char *fmt, ...) {
    char buf[480];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    moe_internal_set_error(st, "%s", buf);
    return st;
}

static int vk_has_ext(const VkExtensionProperties *e, uint32_t n, const char *name) {
    for (uint32_t i = 0; i < n; i++)
        if (!strcmp(e[i].extensionName, name)) return 1;
    return 0;
}

static moe_status vk_create_instance(moe_vk_backend *vk) {
    vk_fns *f = &vk->f;
    const char *layers[1], *exts[1];
    uint32_t n_layers = 0, n_exts = 0;
    VkDebugUtilsMessengerCreateInfoEXT mci = {VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT, NULL, 0,
        VK_DEBUG_UTILS_MESSAGE_SEVERITY_INFO_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT |
            VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
        VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
            VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
        vk_messenger_cb, vk};
    if (vk_env_on("MOE_VK_VALIDATION")) {
        uint32_t n = 0;
        VkLayerProperties *lp = NULL;
        int have_layer = 0, have_utils = 0;
        if (f->EnumerateInstanceLayerProperties(&n, NULL) == VK_SUCCESS && n && (lp = calloc(n, sizeof *lp)) &&
            f->EnumerateInstanceLayerProperties(&n, lp) >= VK_SUCCESS)
            for (uint32_t i = 0; i < n; i++) have_layer |= !strcmp(lp[i].layerName, "VK_LAYER_KHRONOS_validation");
        free(lp);
        VkExtensionProperties *ep = NULL;
        n = 0;
        if (f->EnumerateInstanceExtensionProperties(NULL, &n, NULL) == VK_SUCCESS && n && (ep = calloc(n, sizeof *ep)) &&
            f->EnumerateInstanceExtensionProperties(NULL, &n, ep) >= VK_SUCCESS)
            have_utils = vk_has_ext(ep, n, "VK_EXT_debug_utils");
        free(ep);
        if (have_layer && have_utils) {
            layers[n_layers++] = "VK_LAYER_KHRONOS_validation";
            exts[n_exts++] = "VK_EXT_debug_utils";
            vk->validation = 1;
        } else
            vk_log(vk, MOE_LOG_WARN, "MOE_VK_VALIDATION is set but %s is not available (Debian: vulkan-validationlayers)",
                   have_layer ? "VK_EXT_debug_utils" : "VK_LAYER_KHRONOS_validation");
    }
    VkApplicationInfo app = {VK_STRUCTURE_TYPE_APPLICATION_INFO, NULL, "moe", 1, "moe", 1, VK_API_VERSION_1_2};
    VkInstanceCreateInfo ici = {VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, vk->validation ? &mci : NULL, 0, &app,
                                n_layers, layers, n_exts, exts};
    VkResult r = f->CreateInstance(&ici, NULL, &vk->inst);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateInstance failed (%s)", vk_result_str(r));
    const char *missing = vk_load_instance(f, vk->inst);
    if (missing) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the loader lacks %s", missing);
    if (vk->validation && f->CreateDebugUtilsMessengerEXT) {
        r = f->CreateDebugUtilsMessengerEXT(vk->inst, &mci, NULL, &vk->messenger);
        if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateDebugUtilsMessengerEXT failed (%s)", vk_result_str(r));
    }
    return MOE_OK;
}

/* What a physical device offers; why[] is empty when it can run moe. */
typedef struct vk_probe {
    VkPhysicalDevice pd;
    VkPhysicalDeviceProperties props;
    uint32_t qfam, subgroup, ts_bits;
    VkDeviceSize max_alloc;
    int coopmat;
    char why[200];
} vk_probe;

static VkDeviceSize g_vk_window_cap_override; /* test hook: smaller weight windows to exercise splits */

static void vk_probe_device(moe_vk_backend *vk, VkPhysicalDevice pd, vk_probe *p) {
    vk_fns *f = &vk->f;
    memset(p, 0, sizeof *p);
    p->pd = pd;
    VkPhysicalDeviceSubgroupProperties sg = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES, NULL, 0, 0, 0, 0};
    VkPhysicalDevicePushDescriptorPropertiesKHR pdp = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PUSH_DESCRIPTOR_PROPERTIES_KHR, &sg, 0};
    VkPhysicalDeviceMaintenance3Properties m3 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES, &pdp, 0, 0};
    VkPhysicalDeviceProperties2 pr2;
    memset(&pr2, 0, sizeof pr2);
    pr2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
    pr2.pNext = &m3;
    f->GetPhysicalDeviceProperties(pd, &p->props);
    const VkPhysicalDeviceLimits *lim = &p->props.limits;
    char name[64]; /* a copy: snprintf into p->why must not read from *p */
    snprintf(name, sizeof name, "%.63s", p->props.deviceName);
    if (p->props.apiVersion < VK_API_VERSION_1_2) {
        snprintf(p->why, sizeof p->why, "%s: Vulkan %u.%u, 1.2 is needed", name, VK_VERSION_MAJOR(p->props.apiVersion),
                 VK_VERSION_MINOR(p->props.apiVersion));
        return;
    }
    f->GetPhysicalDeviceProperties2(pd, &pr2);
    p->subgroup = sg.subgroupSize;
    p->max_alloc = m3.maxMemoryAllocationSize ? m3.maxMemoryAllocationSize : ((VkDeviceSize)1 << 30);
    uint32_t nq = 0;
    f->GetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    if (nq > 32) nq = 32;
    f->GetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    int q = -1;
    for (uint32_t i = 0; i < nq; i++) /* a compute queue; one that also has timestamps is better */
        if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && (q < 0 || (!qf[q].timestampValidBits && qf[i].timestampValidBits))) q = (int)i;
    uint32_t n_ext = 0;
    VkExtensionProperties *ext = NULL;
    if (f->EnumerateDeviceExtensionProperties(pd, NULL, &n_ext, NULL) == VK_SUCCESS && n_ext)
        ext = calloc(n_ext, sizeof *ext);
    if (ext && f->EnumerateDeviceExtensionProperties(pd, NULL, &n_ext, ext) < VK_SUCCESS) n_ext = 0;
    VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV, NULL, 0, 0};
    VkPhysicalDeviceVulkanMemoryModelFeatures vmm = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, NULL, 0, 0, 0};
    VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES, &vmm, 0, 0};
    int has_cm_ext = ext && vk_has_ext(ext, n_ext, "VK_NV_cooperative_matrix");
    if (has_cm_ext) vmm.pNext = &cmf;
    VkPhysicalDeviceFeatures2 ft;
    memset(&ft, 0, sizeof ft);
    ft.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    ft.pNext = &f16;
    f->GetPhysicalDeviceFeatures2(pd, &ft);
    const uint32_t sg_need = VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_ARITHMETIC_BIT;
    if (q < 0) snprintf(p->why, sizeof p->why, "%s: no compute queue", name);
    else if (!ext || !vk_has_ext(ext, n_ext, "VK_KHR_push_descriptor"))
        snprintf(p->why, sizeof p->why, "%s: lacks VK_KHR_push_descriptor", name);
    else if (!(sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) || (sg.supportedOperations & sg_need) != sg_need || sg.subgroupSize < 4)
        snprintf(p->why, sizeof p->why, "%s: lacks subgroup arithmetic in compute shaders (or subgroups of >= 4)", name);
    else if (!ft.features.shaderStorageBufferArrayDynamicIndexing)
        snprintf(p->why, sizeof p->why, "%s: lacks shaderStorageBufferArrayDynamicIndexing", name);
    else if (pdp.maxPushDescriptors < 6 + VK_XBUFS + 1 || lim->maxPerStageDescriptorStorageBuffers < 6 + VK_XBUFS + 1)
        snprintf(p->why, sizeof p->why, "%s: fewer than %d storage-buffer (push) descriptors per stage", name, 6 + VK_XBUFS + 1);
    else if (lim->maxComputeSharedMemorySize < 32768 || lim->maxComputeWorkGroupInvocations < 256 || lim->maxPushConstantsSize < 128)
        snprintf(p->why, sizeof p->why, "%s: compute limits too small (32 KiB shared memory, 256 invocations needed)", name);
    else if (lim->maxStorageBufferRange < (1u << 24))
        snprintf(p->why, sizeof p->why, "%s: maxStorageBufferRange %u is below 16 MiB", name, lim->maxStorageBufferRange);
    if (!p->why[0]) {
        p->qfam = (uint32_t)q;
        p->ts_bits = lim->timestampComputeAndGraphics ? qf[q].timestampValidBits : 0;
    }
    /* tensor cores: GL_NV_cooperative_matrix 16x8x16, f16 inputs, f32 accumulators, subgroup of 32 */
    if (!p->why[0] && has_cm_ext && cmf.cooperativeMatrix && f16.shaderFloat16 && vmm.vulkanMemoryModel &&
        vmm.vulkanMemoryModelDeviceScope && sg.subgroupSize == 32 &&
        lim->maxComputeSharedMemorySize >= 48 * 1024 && f->GetPhysicalDeviceCooperativeMatrixPropertiesNV && !vk_env_on("MOE_VK_NO_COOPMAT")) {
        uint32_t n = 0;
        VkCooperativeMatrixPropertiesNV cp[64];
        if (f->GetPhysicalDeviceCooperativeMatrixPropertiesNV(pd, &n, NULL) >= VK_SUCCESS) {
            if (n > 64) n = 64;
            for (uint32_t i = 0; i < n; i++) {
                memset(&cp[i], 0, sizeof cp[i]);
                cp[i].sType = VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV;
            }
            if (f->GetPhysicalDeviceCooperativeMatrixPropertiesNV(pd, &n, cp) >= VK_SUCCESS)
                for (uint32_t i = 0; i < n; i++)
                    p->coopmat |= cp[i].MSize == 16 && cp[i].NSize == 8 && cp[i].KSize == 16 && cp[i].AType == VK_COMPONENT_TYPE_FLOAT16_NV &&
                                  cp[i].BType == VK_COMPONENT_TYPE_FLOAT16_NV && cp[i].CType == VK_COMPONENT_TYPE_FLOAT32_NV &&
                                  cp[i].DType == VK_COMPONENT_TYPE_FLOAT32_NV && cp[i].scope == VK_SCOPE_SUBGROUP_NV;
        }
    }
    free(ext);
}

static int vk_type_rank(VkEnum t) {
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 0;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 1;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return 3;
    default: return 4;
    }
}

/* Picks the device_index-th usable device, discrete GPUs first, and creates the logical device. */
static moe_status vk_create_device(moe_vk_backend *vk, int32_t device_index) {
    vk_fns *f = &vk->f;
    uint32_t n = 0;
    VkResult r = f->EnumeratePhysicalDevices(vk->inst, &n, NULL);
    if (r != VK_SUCCESS || n == 0) return vk_fail(MOE_ERR_DEVICE, "Vulkan: no physical device (is a driver installed? Debian: mesa-vulkan-drivers)");
    VkPhysicalDevice pds[16];
    vk_probe probes[16];
    if (n > 16) n = 16;
    r = f->EnumeratePhysicalDevices(vk->inst, &n, pds);
    if (r < VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkEnumeratePhysicalDevices failed (%s)", vk_result_str(r));
    int order[16], n_ok = 0;
    char why[480] = "";
    for (uint32_t i = 0; i < n; i++) {
        vk_probe_device(vk, pds[i], &probes[i]);
        if (probes[i].why[0]) {
            size_t l = strlen(why);
            snprintf(why + l, sizeof why - l, "%s%s", l ? "; " : "", probes[i].why);
            continue;
        }
        int j = n_ok++; /* insertion by rank, stable */
        while (j > 0 && vk_type_rank(probes[order[j - 1]].props.deviceType) > vk_type_rank(probes[i].props.deviceType)) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = (int)i;
    }
    if (n_ok == 0) return vk_fail(MOE_ERR_DEVICE, "Vulkan: no usable device (%s)", why);
    if (device_index >= n_ok)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: device_index %d but only %d usable device(s)", device_index, n_ok);
    const vk_probe *p = &probes[order[device_index]];
    vk->pd = p->pd;
    vk->props = p->props;
    vk->qfam = p->qfam;
    vk->subgroup = p->subgroup;
    vk->coopmat = p->coopmat;
    vk->timestamps = p->ts_bits > 0;
    vk->ts_ns = p->props.limits.timestampPeriod;
    vk->ts_mask = p->ts_bits >= 64 ? ~0ull : (1ull << p->ts_bits) - 1;
    f->GetPhysicalDeviceMemoryProperties(vk->pd, &vk->memp);
    VkDeviceSize cap = p->props.limits.maxStorageBufferRange;
    if (cap > p->max_alloc) cap = p->max_alloc;
    if (cap > 0xffffffffull) cap = 0xffffffffull;
    if (g_vk_window_cap_override && g_vk_window_cap_override < cap) cap = g_vk_window_cap_override;
    vk->win_cap = (cap - VK_ALIGN) / VK_ALIGN * VK_ALIGN;

    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci = {VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, NULL, 0, vk->qfam, 1, &prio};
    const char *exts[2] = {"VK_KHR_push_descriptor", "VK_NV_cooperative_matrix"};
    VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV, NULL, 1, 0};
    /* the coopmat shaders use the Vulkan memory model; with it on, every shader's atomics (device
       scope by default in GLSL) need vulkanMemoryModelDeviceScope too */
    VkPhysicalDeviceVulkanMemoryModelFeatures vmm = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, &cmf, 1, 1, 0};
    VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES, &vmm, 1, 0};
    VkPhysicalDeviceFeatures2 ft;
    memset(&ft, 0, sizeof ft);
    ft.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    ft.pNext = vk->coopmat ? &f16 : NULL;
    ft.features.shaderStorageBufferArrayDynamicIndexing = 1;
    VkDeviceCreateInfo dci = {VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, &ft, 0, 1, &qci, 0, NULL, vk->coopmat ? 2u : 1u, exts, NULL};
    r = f->CreateDevice(vk->pd, &dci, NULL, &vk->dev);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateDevice on %s failed (%s)", p->props.deviceName, vk_result_str(r));
    const char *missing = vk_load_device(f, vk->dev);
    if (missing) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the driver of %s lacks %s", p->props.deviceName, missing);
    f->GetDeviceQueue(vk->dev, vk->qfam, 0, &vk->queue);
    vk_log(vk, MOE_LOG_INFO, "Vulkan device %d: %s (Vulkan %u.%u, subgroup %u, max storage buffer %u MiB%s%s%s)", device_index,
           p->props.deviceName, VK_VERSION_MAJOR(p->props.apiVersion), VK_VERSION_MINOR(p->props.apiVersion), vk->subgroup,
           (unsigned)(p->props.limits.maxStorageBufferRange >> 20), vk->coopmat ? ", NV cooperative matrix" : "",
           vk->timestamps ? ", timestamps" : "", vk->validation ? ", validation layer on" : "");
    return MOE_OK;
}

/* ============================================================================================ */
/* 4. memory                                                                                     */
/* ============================================================================================ */
enum { VK_MEM_DEVICE, VK_MEM_HOST, VK_MEM_HOST_READ };

static VkDeviceSize vk_align_up(VkDeviceSize v, VkDeviceSize a) { return (v + a - 1) / a * a; }

/* a memory type in bits with all of want; prefer also: first try want|prefer */
static int vk_mem_type(const moe_vk_backend *vk, uint32_t bits, VkFlags want, VkFlags prefer) {
    for (int pass = 0; pass < 2; pass++) {
        VkFlags need = pass == 0 ? want | prefer : want;
        for (uint32_t i = 0; i < vk->memp.memoryTypeCount; i++)
            if ((bits & (1u << i)) && (vk->memp.memoryTypes[i].propertyFlags & need) == need) return (int)i;
    }
    return -1;
}

static void vk_buf_free(moe_vk_backend *vk, vk_buf *b) {
    if (!vk || !vk->dev || !b) return;
    if (b->buf) vk->f.DestroyBuffer(vk->dev, b->buf, NULL);
    if (b->mem) vk->f.FreeMemory(vk->dev, b->mem, NULL); /* frees the mapping too */
    memset(b, 0, sizeof *b);
}

/* A storage buffer with its own memory: device-local, or host-visible + coherent (and mapped). */
static moe_status vk_buf_new(moe_vk_backend *vk, vk_buf *b, VkDeviceSize size, int kind, const char *what) {
    vk_fns *f = &vk->f;
    memset(b, 0, sizeof *b);
    size = vk_align_up(size ? size : 4, 4);
    VkBufferCreateInfo bci = {VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, NULL, 0, size,
                              VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              VK_SHARING_MODE_EXCLUSIVE, 0, NULL};
    VkResult r = f->CreateBuffer(vk->dev, &bci, NULL, &b->buf);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateBuffer (%s, %llu bytes) failed (%s)", what, (unsigned long long)size, vk_result_str(r));
    VkMemoryRequirements req;
    f->GetBufferMemoryRequirements(vk->dev, b->buf, &req);
    int t = kind == VK_MEM_DEVICE ? vk_mem_type(vk, req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0)
          : vk_mem_type(vk, req.memoryTypeBits, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT,
                        kind == VK_MEM_HOST_READ ? VK_MEMORY_PROPERTY_HOST_CACHED_BIT : 0);
    if (t < 0) {
        vk_buf_free(vk, b);
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: no suitable memory type for %s", what);
    }
    VkMemoryAllocateInfo mai = {VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, NULL, req.size, (uint32_t)t};
    r = f->AllocateMemory(vk->dev, &mai, NULL, &b->mem);
    if (r == VK_SUCCESS) r = f->BindBufferMemory(vk->dev, b->buf, b->mem, 0);
    if (r == VK_SUCCESS && kind != VK_MEM_DEVICE) {
        void *p = NULL;
        r = f->MapMemory(vk->dev, b->mem, 0, VK_WHOLE_SIZE, 0, &p);
        b->map = p;
    }
    if (r != VK_SUCCESS) {
        vk_buf_free(vk, b);
        return vk_fail(r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY ? MOE_ERR_NO_MEMORY : MOE_ERR_DEVICE,
                       "Vulkan: allocating %.1f MiB for %s failed (%s)", (double)size / 1048576.0, what, vk_result_str(r));
    }
    b->size = size;
    return MOE_OK;
}

/* ---- transfers: host <-> device buffers through two host-visible staging halves, so that the
   CPU fills one half while the GPU copies the other. Errors stick in x->st. ---- */
typedef struct vk_region { VkBuffer buf; VkDeviceSize soff, doff, size; uint8_t *host; } vk_region;
typedef struct vk_half { vk_buf stage; VkCommandBuffer cb; VkFence fence; vk_region *reg; int n, cap, pending; } vk_half;
typedef struct vk_xfer {
    moe_vk_backend *vk;
    VkCommandPool pool;
    vk_half h[2];
    int cur, download;
    VkDeviceSize fill, half_size;
    moe_status st;
} vk_xfer;

static moe_status vk_wait_fence(moe_vk_backend *vk, VkFence fence, const char *what) {
    VkResult r = vk->f.WaitForFences(vk->dev, 1, &fence, 1, 120ull * 1000000000ull);
    if (r == VK_SUCCESS) r = vk->f.ResetFences(vk->dev, 1, &fence);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: waiting for %s failed (%s)", what, vk_result_str(r));
    return MOE_OK;
}

static moe_status vk_submit(moe_vk_backend *vk, VkCommandBuffer cb, VkFence fence, const char *what) {
    VkSubmitInfo si = {VK_STRUCTURE_TYPE_SUBMIT_INFO, NULL, 0, NULL, NULL, 1, &cb, 0, NULL};
    pthread_mutex_lock(&vk->lock);
    VkResult r = vk->f.QueueSubmit(vk->queue, 1, &si, fence);
    pthread_mutex_unlock(&vk->lock);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkQueueSubmit (%s) failed (%s)", what, vk_result_str(r));
    return MOE_OK;
}

static void vk_xfer_wait(vk_xfer *x, int i) {
    vk_half *h = &x->h[i];
    if (!h->pending) return;
    h->pending = 0;
    moe_status st = vk_wait_fence(x->vk, h->fence, "a transfer");
    if (st && !x->st) x->st = st;
    if (!st && x->download)
        for (int k = 0; k < h->n; k++) memcpy(h->reg[k].host, h->stage.map + h->reg[k].soff, h->reg[k].size);
    h->n = 0;
}

static void vk_xfer_flush(vk_xfer *x) {
    vk_half *h = &x->h[x->cur];
    if (x->st || h->n == 0) return;
    vk_fns *f = &x->vk->f;
    VkCommandBufferBeginInfo bi = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO, NULL, VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT, NULL};
    VkResult r = f->ResetCommandBuffer(h->cb, 0);
    if (r == VK_SUCCESS) r = f->BeginCommandBuffer(h->cb, &bi);
    if (r != VK_SUCCESS) {
        x->st = vk_fail(MOE_ERR_DEVICE, "Vulkan: recording a transfer failed (%s)", vk_result_str(r));
        return;
    }
    /* make earlier device writes visible to the copies, and the copies to later work */
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT | VK_ACCESS_HOST_WRITE_BIT,
                          VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
    f->CmdPipelineBarrier(h->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                          VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
    for (int k = 0; k < h->n; k++) {
        VkBufferCopy c = {h->reg[k].soff, h->reg[k].doff, h->reg[k].size};
        if (x->download) {
            c.srcOffset = h->reg[k].doff;
            c.dstOffset = h->reg[k].soff;
            f->CmdCopyBuffer(h->cb, h->reg[k].buf, h->stage.buf, 1, &c);
        } else
            f->CmdCopyBuffer(h->cb, h->stage.buf, h->reg[k].buf, 1, &c);
    }
    VkMemoryBarrier mb2 = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_TRANSFER_WRITE_BIT,
                           VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_HOST_READ_BIT};
    f->CmdPipelineBarrier(h->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                          0, 1, &mb2, 0, NULL, 0, NULL);
    r = f->EndCommandBuffer(h->cb);
    if (r != VK_SUCCESS) {
        x->st = vk_fail(MOE_ERR_DEVICE, "Vulkan: recording a transfer failed (%s)", vk_result_str(r));
        return;
    }
    moe_status st = vk_submit(x->vk, h->cb, h->fence, "transfer");
    if (st) {
        x->st = st;
        return;
    }
    h->pending = 1;
    x->cur ^= 1;
    x->fill = 0;
    vk_xfer_wait(x, x->cur);
}

/* queues a copy of n bytes between host and (buf, off) */
static void vk_xfer_copy(vk_xfer *x, uint8_t *host, VkDeviceSize n, VkBuffer buf, VkDeviceSize off) {
    while (n > 0 && !x->st) {
        vk_half *h = &x->h[x->cur];
        if (x->fill + 16 > x->half_size || h->n == h->cap) {
            vk_xfer_flush(x);
            continue;
        }
        VkDeviceSize c = x->half_size - x->fill < n ? x->half_size - x->fill : n;
        vk_region *g = &h->reg[h->n++];
        g->buf = buf;
        g->soff = x->fill;
        g->doff = off;
        g->size = c;
        g->host = host;
        if (!x->download) memcpy(h->stage.map + x->fill, host, c);
        x->fill = vk_align_up(x->fill + c, 16);
        host += c;
        off += c;
        n -= c;
    }
}

static moe_status vk_xfer_end(vk_xfer *x) {
    if (!x->st) vk_xfer_flush(x);
    for (int i = 0; i < 2; i++) vk_xfer_wait(x, i);
    moe_vk_backend *vk = x->vk;
    for (int i = 0; i < 2; i++) {
        if (x->h[i].fence) vk->f.DestroyFence(vk->dev, x->h[i].fence, NULL);
        vk_buf_free(vk, &x->h[i].stage);
        free(x->h[i].reg);
    }
    if (x->pool) vk->f.DestroyCommandPool(vk->dev, x->pool, NULL);
    moe_status st = x->st;
    memset(x, 0, sizeof *x);
    return st;
}

static moe_status vk_xfer_begin(moe_vk_backend *vk, vk_xfer *x, VkDeviceSize half, int download) {
    memset(x, 0, sizeof *x);
    x->vk = vk;
    x->download = download;
    x->half_size = half;
    vk_fns *f = &vk->f;
    VkCommandPoolCreateInfo pci = {VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, NULL, VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, vk->qfam};
    VkResult r = f->CreateCommandPool(vk->dev, &pci, NULL, &x->pool);
    VkCommandBuffer cbs[2] = {0, 0};
    VkCommandBufferAllocateInfo cai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, NULL, x->pool, VK_COMMAND_BUFFER_LEVEL_PRIMARY, 2};
    if (r == VK_SUCCESS) r = f->AllocateCommandBuffers(vk->dev, &cai, cbs);
    VkFenceCreateInfo fci = {VK_STRUCTURE_TYPE_FENCE_CREATE_INFO, NULL, 0};
    for (int i = 0; i < 2 && r == VK_SUCCESS; i++) {
        x->h[i].cb = cbs[i];
        r = f->CreateFence(vk->dev, &fci, NULL, &x->h[i].fence);
    }
    if (r != VK_SUCCESS) {
        x->st = vk_fail(MOE_ERR_DEVICE, "Vulkan: setting up a transfer failed (%s)", vk_result_str(r));
        return vk_xfer_end(x);
    }
    for (int i = 0; i < 2; i++) {
        moe_status st = vk_buf_new(vk, &x->h[i].stage, half, download ? VK_MEM_HOST_READ : VK_MEM_HOST, "a staging buffer");
        x->h[i].cap = 1024;
        x->h[i].reg = calloc((size_t)x->h[i].cap, sizeof(vk_region));
        if (!st && !x->h[i].reg) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        if (st) {
            x->st = st;
            return vk_xfer_end(x);
        }
    }
    return MOE_OK;
}

/* ---- weights: placement into windows, upload, expert tables ---- */
typedef struct vk_placer { VkDeviceSize cap, used; uint32_t cur; VkDeviceSize *win_used; uint32_t n_win, win_cap_n; } vk_placer;

/* room for bytes (+ padding) in the current window, or a new window; returns 0 when out of memory */
static int vk_place(vk_placer *p, VkDeviceSize bytes, uint32_t *win, VkDeviceSize *off) {
    VkDeviceSize at = vk_align_up(p->used, VK_ALIGN);
    if (p->n_win == 0 || at + bytes + VK_PAD > p->cap) {
        if (p->n_win == p->win_cap_n) {
            uint32_t nc = p->win_cap_n ? 2 * p->win_cap_n : 16;
            VkDeviceSize *nw = realloc(p->win_used, nc * sizeof *nw);
            if (!nw) return 0;
            p->win_used = nw;
            p->win_cap_n = nc;
        }
        p->cur = p->n_win++;
        at = 0;
    }
    *win = p->cur;
    *off = at;
    p->used = at + bytes + VK_PAD;
    p->win_used[p->cur] = p->used;
    return 1;
}

/* every tensor role of the model in a fixed order (global roles, then layer by layer);
   i < vk_n_weights(w); absent tensors have no data. w->dev is the backend's to set. */
static int vk_n_weights(const moe_weights *w) { return MOE_GT_COUNT + w->hp.n_layer * MOE_LT_COUNT; }
static int vk_weight_layer(int i) { return i < MOE_GT_COUNT ? -1 : (i - MOE_GT_COUNT) / MOE_LT_COUNT; }
static moe_weight *vk_weight_at(const moe_weights *w, int i) {
    if (i < MOE_GT_COUNT) return moe_weight_of(w, -1, i);
    return moe_weight_of(w, vk_weight_layer(i), (i - MOE_GT_COUNT) % MOE_LT_COUNT);
}

/* checks what the kernels assume about a weight */
static moe_status vk_check_weight(const moe_weight *w) {
    if (vk_type_index(w->type) < 0) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: tensor '%s' has type %d, which has no kernel", w->name, w->type);
    if (w->n_dims >= 2 && w->ne[0] % 16)
        return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: tensor '%s' has rows of %lld elements (kernels need a multiple of 16)", w->name, (long long)w->ne[0]);
    if (w->n_dims == 1 && w->type != MOE_TYPE_F32) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: 1-D tensor '%s' is not f32", w->name);
    return MOE_OK;
}

static moe_status vk_upload_weights(moe_vk_backend *vk, const moe_weights *w) {
    const moe_hparams *hp = &w->hp;
    int n = vk_n_weights(w);
    moe_status st = MOE_OK;
    vk_placer pl = {vk->win_cap, 0, 0, NULL, 0, 0};
    size_t n_tbl = 0; /* expert table entries: one per expert of every 3-D tensor, layer by layer */
    for (int i = 0; i < n; i++) {
        const moe_weight *mw = vk_weight_at(w, i);
        if (mw->data && mw->n_dims == 3) n_tbl += (size_t)mw->ne[2];
    }
    uint32_t *tbl = calloc(n_tbl ? 2 * n_tbl : 2, sizeof *tbl);      /* (window, offset) pairs, absolute for now */
    VkDeviceSize *tbl_off = calloc(n_tbl ? n_tbl : 1, sizeof *tbl_off); /* full offsets, to check the 32-bit range */
    vk->wts = calloc((size_t)n, sizeof *vk->wts);
    vk->parts = NULL;
    uint32_t parts_cap = 0, tbl_next = 0;
    if (!tbl || !tbl_off || !vk->wts) {
        st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        goto done;
    }
    vk->n_wts = (uint32_t)n;
    /* 1. placement */
    for (int i = 0; i < n && !st; i++) {
        moe_weight *mw = vk_weight_at(w, i);
        vk_wt *wt = &vk->wts[i];
        if (!mw->data) continue;
        if (i == MOE_OUTPUT && mw->data == w->g[MOE_TOK_EMBD].data) { /* tied output: share the embedding's placement */
            *wt = vk->wts[MOE_TOK_EMBD];
            continue;
        }
        if ((st = vk_check_weight(mw))) break;
        if (mw->n_dims == 3) {
            uint32_t E = (uint32_t)mw->ne[2];
            wt->experts = 1;
            wt->tbl = tbl_next;
            tbl_next += E;
            if (mw->expert_bytes + VK_PAD > vk->win_cap) {
                st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: one expert of '%s' (%llu bytes) exceeds a storage window (%llu bytes)", mw->name,
                             (unsigned long long)mw->expert_bytes, (unsigned long long)vk->win_cap);
                break;
            }
            for (uint32_t e = 0; e < E && !st; e++) {
                uint32_t win;
                VkDeviceSize off;
                if (!vk_place(&pl, mw->expert_bytes, &win, &off)) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
                tbl[2 * (wt->tbl + e)] = win;
                tbl_off[wt->tbl + e] = off;
            }
            continue;
        }
        int64_t rows = mw->n_dims == 1 ? 1 : mw->ne[1];
        uint64_t rb = mw->n_dims == 1 ? mw->nbytes : mw->row_bytes;
        int64_t per = (int64_t)((vk->win_cap - VK_PAD) / rb);
        if (per < 1) {
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: a row of '%s' exceeds a storage window", mw->name);
            break;
        }
        wt->part0 = vk->n_parts;
        for (int64_t r0 = 0; r0 < rows && !st; r0 += per) {
            if (vk->n_parts == parts_cap) {
                parts_cap = parts_cap ? 2 * parts_cap : 256;
                vk_part *np = realloc(vk->parts, parts_cap * sizeof *np);
                if (!np) {
                    st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
                    break;
                }
                vk->parts = np;
            }
            vk_part *p = &vk->parts[vk->n_parts++];
            p->row_lo = r0;
            p->row_hi = r0 + per < rows ? r0 + per : rows;
            p->bytes = (VkDeviceSize)(p->row_hi - p->row_lo) * rb;
            if (!vk_place(&pl, p->bytes, &p->win, &p->off)) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
            wt->n_parts++;
        }
    }
    /* per layer, the windows of its expert tensors must fit the 8-entry binding; entries become relative */
    for (int l = 0; l < hp->n_layer && !st; l++) {
        int i0 = MOE_GT_COUNT + l * MOE_LT_COUNT;
        uint32_t lo = UINT32_MAX, hi = 0;
        for (int i = i0; i < i0 + MOE_LT_COUNT; i++)
            for (uint32_t j = vk->wts[i].tbl; vk->wts[i].experts && j < vk->wts[i].tbl + (uint32_t)vk_weight_at(w, i)->ne[2]; j++) {
                lo = tbl[2 * j] < lo ? tbl[2 * j] : lo;
                hi = tbl[2 * j] > hi ? tbl[2 * j] : hi;
            }
        if (lo == UINT32_MAX) continue; /* no experts in this layer */
        if (hi - lo >= VK_XBUFS) {
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: the experts of layer %d span %u storage windows (at most %d)", l, hi - lo + 1, VK_XBUFS);
            break;
        }
        for (int i = i0; i < i0 + MOE_LT_COUNT; i++) {
            if (!vk->wts[i].experts) continue;
            vk->wts[i].win0 = lo;
            for (uint32_t j = vk->wts[i].tbl; j < vk->wts[i].tbl + (uint32_t)vk_weight_at(w, i)->ne[2]; j++) {
                tbl[2 * j] -= lo;
                tbl[2 * j + 1] = (uint32_t)tbl_off[j];
            }
        }
    }
    if (st) goto done;
    /* 2. windows */
    vk->win = calloc(pl.n_win ? pl.n_win : 1, sizeof *vk->win);
    if (!vk->win) {
        st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        goto done;
    }
    for (uint32_t i = 0; i < pl.n_win && !st; i++) {
        st = vk_buf_new(vk, &vk->win[i], vk_align_up(pl.win_used[i], VK_ALIGN), VK_MEM_DEVICE, "weights");
        if (!st) {
            vk->n_win++;
            vk->weight_bytes += vk->win[i].size;
        }
    }
    if (!st) st = vk_buf_new(vk, &vk->tables, (VkDeviceSize)(n_tbl ? n_tbl : 1) * 8, VK_MEM_DEVICE, "expert tables");
    if (st) goto done;
    /* 3. upload */
    vk_xfer x;
    if ((st = vk_xfer_begin(vk, &x, (VkDeviceSize)32 << 20, 0))) goto done;
    for (int i = 0; i < n; i++) {
        moe_weight *mw = vk_weight_at(w, i);
        vk_wt *wt = &vk->wts[i];
        if (!mw->data) continue;
        mw->dev = wt;
        if (i == MOE_OUTPUT && mw->data == w->g[MOE_TOK_EMBD].data) continue;
        if (wt->experts) {
            for (uint32_t e = 0; e < (uint32_t)mw->ne[2]; e++) {
                size_t j = wt->tbl + e;
                vk_xfer_copy(&x, (uint8_t *)(uintptr_t)mw->expert_data[e], mw->expert_bytes, vk->win[tbl[2 * j] + wt->win0].buf, tbl[2 * j + 1]);
            }
            continue;
        }
        uint64_t rb = mw->n_dims == 1 ? mw->nbytes : mw->row_bytes;
        for (uint32_t k = 0; k < wt->n_parts; k++) {
            const vk_part *p = &vk->parts[wt->part0 + k];
            vk_xfer_copy(&x, (uint8_t *)(uintptr_t)mw->data + (uint64_t)p->row_lo * rb, p->bytes, vk->win[p->win].buf, p->off);
        }
    }
    vk_xfer_copy(&x, (uint8_t *)tbl, (VkDeviceSize)n_tbl * 8, vk->tables.buf, 0);
    st = vk_xfer_end(&x);
done:
    free(pl.win_used);
    free(tbl);
    free(tbl_off);
    return st;
}

/* ============================================================================================ */
/* 5. pipelines                                                                                  */
/* ============================================================================================ */
#define VK_PC_WORDS 20 /* every dispatch pushes 80 bytes: a superset of each shader's push-constant block */

static const moe_spirv *vk_find_spirv(const char *name) {
    size_t lo = 0, hi = moe_vk_spirv_count;
    while (lo < hi) { /* the table is sorted by name */
        size_t mid = (lo + hi) / 2;
        int c = strcmp(moe_vk_spirv[mid].name, name);
        if (c == 0) return &moe_vk_spirv[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* The pipeline of kernel id with specialization constant 1 = spec (the head size for attn.comp,
   0 for kernels without one), built on first use (under the backend's lock); *var says which of
   the kernel's variants it is. */
static moe_status vk_pipe(moe_vk_backend *vk, int id, uint32_t spec, VkPipeline *out, int *var) {
    pthread_mutex_lock(&vk->lock);
    moe_status st = MOE_OK;
    int v = 0;
    while (v < VK_VARIANTS && vk->pipes[id][v] && vk->pipe_spec[id][v] != spec) v++;
    char name[48];
    if (id < VKP_ADD) snprintf(name, sizeof name, "%s_%s", k_vk_kind_names[id / VKT_COUNT], k_vk_type_names[id % VKT_COUNT]);
    else snprintf(name, sizeof name, "%s", k_vk_plain[id - VKP_ADD].name);
    if (v == VK_VARIANTS) st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: more than %d variants of the '%s' kernel", VK_VARIANTS, name);
    else if (!vk->pipes[id][v]) {
        uint32_t wg = id < VKP_ADD ? k_vk_kind_wg[id / VKT_COUNT] : k_vk_plain[id - VKP_ADD].wg;
        const moe_spirv *sp = vk_find_spirv(name);
        VkShaderModule mod = 0;
        VkResult r = -13;
        if (sp) {
            VkShaderModuleCreateInfo smi = {VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, NULL, 0, sp->size_bytes, sp->code};
            r = vk->f.CreateShaderModule(vk->dev, &smi, NULL, &mod);
        }
        if (r == VK_SUCCESS) {
            /* constant 0: workgroup size; 1: the head size (attn.comp; others ignore it) */
            uint32_t spec_vals[2] = {wg, spec};
            VkSpecializationMapEntry me[2] = {{0, 0, 4}, {1, 4, 4}};
            VkSpecializationInfo si = {2, me, 8, spec_vals};
            VkComputePipelineCreateInfo ci;
            memset(&ci, 0, sizeof ci);
            ci.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
            ci.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
            ci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
            ci.stage.module = mod;
            ci.stage.pName = "main";
            ci.stage.pSpecializationInfo = &si;
            ci.layout = vk->layout;
            ci.basePipelineIndex = -1;
            r = vk->f.CreateComputePipelines(vk->dev, 0, 1, &ci, NULL, &vk->pipes[id][v]);
            vk->f.DestroyShaderModule(vk->dev, mod, NULL);
        }
        if (r != VK_SUCCESS) {
            vk->pipes[id][v] = 0;
            st = vk_fail(MOE_ERR_DEVICE, "Vulkan: building the '%s' kernel failed (%s)", name, sp ? vk_result_str(r) : "no such SPIR-V in shaders_embedded.c");
        } else vk->pipe_spec[id][v] = spec;
    }
    *out = v < VK_VARIANTS ? vk->pipes[id][v] : 0;
    *var = v;
    pthread_mutex_unlock(&vk->lock);
    return st;
}

void moe_vk_free(moe_vk_backend *vk) {
    if (!vk) return;
    vk_fns *f = &vk->f;
    if (vk->dev) { /* resources exist only if every device entry point loaded; the device itself may not */
        if (f->DeviceWaitIdle) f->DeviceWaitIdle(vk->dev);
        for (int i = 0; i < VKP_COUNT; i++)
            for (int v = 0; v < VK_VARIANTS; v++)
                if (vk->pipes[i][v]) f->DestroyPipeline(vk->dev, vk->pipes[i][v], NULL);
        if (vk->layout) f->DestroyPipelineLayout(vk->dev, vk->layout, NULL);
        if (vk->dsl) f->DestroyDescriptorSetLayout(vk->dev, vk->dsl, NULL);
        for (uint32_t i = 0; i < vk->n_win; i++) vk_buf_free(vk, &vk->win[i]);
        vk_buf_free(vk, &vk->tables);
        vk_buf_free(vk, &vk->dummy);
        if (f->DestroyDevice) f->DestroyDevice(vk->dev, NULL);
    }
    if (vk->messenger && f->DestroyDebugUtilsMessengerEXT) f->DestroyDebugUtilsMessengerEXT(vk->inst, vk->messenger, NULL);
    if (vk->inst && f->DestroyInstance) f->DestroyInstance(vk->inst, NULL);
    /* the loader stays loaded: some drivers do not survive being unloaded and loaded again */
    if (vk->w)
        for (uint32_t i = 0; i < vk->n_wts; i++) vk_weight_at(vk->w, (int)i)->dev = NULL;
    if (vk->lock_ok) pthread_mutex_destroy(&vk->lock);
    free(vk->win);
    free(vk->parts);
    free(vk->wts);
    free(vk);
}

moe_status moe_vk_init(const moe_weights *w, int32_t device_index, moe_log_fn log, void *log_user, moe_vk_backend **out) {
    if (!out) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_init: out is NULL");
    *out = NULL;
    if (!w || device_index < 0) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_init: bad arguments");
    const moe_hparams *hp = &w->hp;
    if (hp->n_expert > VK_MAX_EXPERTS || hp->n_expert_used > VK_MAX_TOPK || hp->n_embd % 16)
        return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: model shape not supported by the kernels (experts <= %d, top-k <= %d, embedding width a "
                       "multiple of 16)", VK_MAX_EXPERTS, VK_MAX_TOPK);
    for (int l = 0; l < hp->n_layer; l++) { /* what each layer's plan asks of the kernels */
        const moe_layer_plan *p = &w->layers[l].p;
        const char *why = NULL;
        if (p->attn_kind != MOE_ATTN_FULL) why = "only full causal attention runs on Vulkan yet";
        else if (p->attn.head_dim > 256 || p->attn.head_dim % 8) why = "head size above 256 or not a multiple of 8";
        else if (p->ffn_kind != MOE_FFN_MOE) why = "only routed-expert FFNs run on Vulkan yet";
        else if (p->n_ff_exp % 16) why = "expert width not a multiple of 16";
        else if (p->act != MOE_ACT_SILU) why = "only SiLU experts run on Vulkan yet";
        if (why) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: layer %d: %s", l, why);
    }
    moe_vk_backend *vk = calloc(1, sizeof *vk);
    if (!vk) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of memory");
    vk->log = log;
    vk->log_user = log_user;
    if (pthread_mutex_init(&vk->lock, NULL) != 0) {
        free(vk);
        return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: cannot create a mutex");
    }
    vk->lock_ok = 1;
    moe_status st;
    const char *why = vk_load_global(&vk->f, &vk->lib);
    if (why) {
        st = vk_fail(MOE_ERR_DEVICE, "Vulkan: %s", why);
        goto fail;
    }
    if ((st = vk_create_instance(vk))) goto fail;
    if ((st = vk_create_device(vk, device_index))) goto fail;
    VkDescriptorSetLayoutBinding b[8];
    for (uint32_t i = 0; i < 8; i++) {
        VkDescriptorSetLayoutBinding bi = {i, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, i == 6 ? VK_XBUFS : 1, VK_SHADER_STAGE_COMPUTE_BIT, NULL};
        b[i] = bi;
    }
    VkDescriptorSetLayoutCreateInfo dli = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO, NULL,
                                           VK_DESCRIPTOR_SET_LAYOUT_CREATE_PUSH_DESCRIPTOR_BIT_KHR, 8, b};
    VkResult r = vk->f.CreateDescriptorSetLayout(vk->dev, &dli, NULL, &vk->dsl);
    VkPushConstantRange pcr = {VK_SHADER_STAGE_COMPUTE_BIT, 0, 4 * VK_PC_WORDS};
    VkPipelineLayoutCreateInfo pli = {VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, NULL, 0, 1, &vk->dsl, 1, &pcr};
    if (r == VK_SUCCESS) r = vk->f.CreatePipelineLayout(vk->dev, &pli, NULL, &vk->layout);
    if (r != VK_SUCCESS) {
        st = vk_fail(MOE_ERR_DEVICE, "Vulkan: creating the pipeline layout failed (%s)", vk_result_str(r));
        goto fail;
    }
    if ((st = vk_buf_new(vk, &vk->dummy, VK_ALIGN, VK_MEM_DEVICE, "a filler buffer"))) goto fail;
    vk->w = w;
    if ((st = vk_upload_weights(vk, w))) goto fail;
    vk_log(vk, MOE_LOG_INFO, "Vulkan: %.1f MiB of weights in %u buffer(s) of at most %.0f MiB%s", (double)vk->weight_bytes / 1048576.0,
           vk->n_win, (double)vk->win_cap / 1048576.0, vk->coopmat ? "; prefill matmuls on cooperative matrices" : "");
    *out = vk;
    return MOE_OK;
fail:
    moe_vk_free(vk);
    return st;
}

/* ============================================================================================ */
/* 6. contexts and steps                                                                         */
/* ============================================================================================ */
#define VK_NB 6               /* bindings 0..5 of a record; 6 = weights, 7 = step buffer */
#define VK_CACHE 4            /* command buffers kept for replay */
#define VK_REC_COPY 0xffff    /* record kind: a buffer copy instead of a dispatch */
#define VK_MV_MAX 8           /* up to this many tokens (columns), matmuls are matrix-vector kernels */
#define VK_MV_ROWS 2          /* output rows per matrix-vector workgroup (mv.comp RW) */

/* profiling classes */
enum { VKC_EMBED, VKC_NORM, VKC_MV, VKC_MV_GATEUP, VKC_MV_DOWN, VKC_MM, VKC_MM_GATEUP, VKC_MM_DOWN, VKC_LMHEAD, VKC_ROPE,
       VKC_KVSTORE, VKC_ATTN, VKC_ADD, VKC_TOPK, VKC_SORT, VKC_COMBINE, VKC_COPY, VKC_COUNT };
static const char *const k_vkc_names[VKC_COUNT] = {"embed", "rmsnorm", "matvec", "expert gate+up matvec", "expert down matvec",
    "matmul", "expert gate+up matmul", "expert down matmul", "lm head", "qk-norm/rope", "kv store", "attention", "add",
    "router top-k", "expert sort", "expert combine", "logits copy"};

/* One dispatch (or copy) as an op recorded it. Records are compared byte for byte to find a cached
   command buffer, so every record is zeroed before it is filled. */
typedef struct vk_rec {
    uint16_t pipe;             /* VKP_* or VK_REC_COPY */
    uint8_t kind;              /* VKC_* */
    uint8_t wmask;             /* which of bindings 0..5 the kernel writes */
    uint8_t wmode;             /* binding 6: 0 filler, 1 one dense part (win, woff, wrange), 2 windows win .. win+7 */
    uint8_t var;               /* pipeline variant (vk_pipe) */
    uint8_t pad[2];
    uint32_t win;
    uint32_t grid[3];
    VkDeviceSize woff, wrange;
    VkBuffer buf[VK_NB];
    VkDeviceSize off[VK_NB], range[VK_NB];
    uint32_t pc[VK_PC_WORDS];
} vk_rec;

typedef struct vk_cached { int n; vk_rec *recs; VkCommandBuffer cb; uint64_t used; } vk_cached;

typedef struct vk_ctx {
    moe_vk_backend *vk;
    const moe_weights *w;
    moe_ctx_shape shape;
    int kv_f16, profile, serial;
    vk_buf act[ACT_COUNT];
    vk_buf h, p, aux;          /* MoE: hidden [nb·k][ff], expert outputs [nb·k][D], routing scratch (u32) */
    uint32_t ids_off, w_off, list_off, pos_off, items_off, max_items;
    vk_buf kc, vc;             /* the KV caches one after the other, f16 or f32 */
    VkDeviceSize *kv_off, *kv_size; /* [n_cache] byte offset and (aligned) size of cache c */
    int32_t *kv_rows;          /* [n_cache] rows of cache c */
    struct { moe_rope r; vk_buf tab; } rope[VK_MAX_ROPES]; /* per distinct rope of the layers: [n_ctx][n_rot/2] (cos, sin) */
    int n_rope;
    vk_buf step;               /* host-visible: [0] pos0, [1] n, [4 + i] token i */
    vk_buf logits;             /* host-visible readback of ACT_LOGITS */
    VkCommandPool pool;
    VkFence fence;
    VkQueryPool qpool;
    uint32_t q_cap;
    vk_rec *recs;
    int n_recs, cap_recs;
    vk_cached cache[VK_CACHE];
    uint64_t tick;
    int step_n, step_pos0, have_pos0, logit_rows, dead;
    int route_n, route_k;      /* the last route op: tokens, experts per token */
    int fuse_idx, fuse_role, fuse_rows, fuse_acc; /* the last record, if it may absorb a residual add */
    /* a decode-size RMSNorm not dispatched yet: matrix-vector consumers apply it on the fly, the
       first of them also writes dst (done); anything else that needs dst, or that overwrites dst
       or src, makes it a real dispatch first (vk_pn_touch) */
    struct { int active, done, dst, src, rows, width; const moe_weight *w; float eps; } pn;
    moe_status err;
    char errmsg[400];
    double prof_ns[2][VKC_COUNT][VKP_COUNT + 1];
    uint32_t prof_n[2][VKC_COUNT][VKP_COUNT + 1];
    uint64_t prof_steps[2], prof_tokens[2];
    uint64_t expert_evals;     /* (token, expert) pairs run, counted when a step completes */
    uint64_t step_evals;
    double prof_total[2];
} vk_ctx;

static void vk_pn_flush(vk_ctx *c);
static void vk_pn_touch(vk_ctx *c, unsigned rd, unsigned wr);

/* the first failure of a step sticks; end_step reports it */
static void vk_ctx_fail(vk_ctx *c, moe_status st, const char *fmt, ...) {
    if (c->err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->errmsg, sizeof c->errmsg, fmt, ap);
    va_end(ap);
    c->err = st;
}

/* a new zeroed record of kernel pipe (variant spec, see vk_pipe), or NULL after a failure */
static vk_rec *vk_rec_new_spec(vk_ctx *c, int pipe, uint32_t spec, int kind) {
    if (c->err) return NULL;
    if (c->n_recs == c->cap_recs) {
        int nc = c->cap_recs ? 2 * c->cap_recs : 1024;
        vk_rec *nr = realloc(c->recs, (size_t)nc * sizeof *nr);
        if (!nr) {
            vk_ctx_fail(c, MOE_ERR_NO_MEMORY, "Vulkan: out of host memory recording a step");
            return NULL;
        }
        c->recs = nr;
        c->cap_recs = nc;
    }
    int var = 0;
    if (pipe != VK_REC_COPY) {
        VkPipeline pl;
        moe_status st = vk_pipe(c->vk, pipe, spec, &pl, &var);
        if (st) {
            vk_ctx_fail(c, st, "%s", moe_last_error());
            return NULL;
        }
    }
    vk_rec *r = &c->recs[c->n_recs++];
    memset(r, 0, sizeof *r);
    r->pipe = (uint16_t)pipe;
    r->var = (uint8_t)var;
    r->kind = (uint8_t)kind;
    return r;
}

static vk_rec *vk_rec_new(vk_ctx *c, int pipe, int kind) { return vk_rec_new_spec(c, pipe, 0, kind); }

static void vk_bind(vk_rec *r, int slot, const vk_buf *b, int written) {
    r->buf[slot] = b->buf;
    r->off[slot] = 0;
    r->range[slot] = b->size;
    if (written) r->wmask |= (uint8_t)(1u << slot);
}

static void vk_bind_range(vk_rec *r, int slot, VkBuffer buf, VkDeviceSize off, VkDeviceSize range, int written) {
    r->buf[slot] = buf;
    r->off[slot] = off;
    r->range[slot] = range;
    if (written) r->wmask |= (uint8_t)(1u << slot);
}

/* grid of n workgroups over x (folded into z beyond the x limit) */
static void vk_grid_fold(vk_rec *r, uint64_t n, uint32_t y) {
    uint64_t x = n < 65535 ? n : 65535;
    r->grid[0] = (uint32_t)(x ? x : 1);
    r->grid[1] = y;
    r->grid[2] = (uint32_t)((n + r->grid[0] - 1) / r->grid[0]);
    if (!r->grid[2]) r->grid[2] = 1;
}

/* ---- turning records into commands ---- */
typedef struct vk_hazard { VkBuffer wr[16], rd[32]; int n_wr, n_rd; } vk_hazard;

static int vk_in(const VkBuffer *set, int n, VkBuffer b) {
    for (int i = 0; i < n; i++)
        if (set[i] == b) return 1;
    return 0;
}

static int vk_hazard_add(vk_hazard *h, const vk_rec *r) {
    for (int s = 0; s < VK_NB; s++) {
        if (!r->buf[s]) continue;
        if (((r->wmask >> s) & 1) && !vk_in(h->wr, h->n_wr, r->buf[s])) {
            if (h->n_wr == 16) return 0;
            h->wr[h->n_wr++] = r->buf[s];
        }
        if (!vk_in(h->rd, h->n_rd, r->buf[s])) {
            if (h->n_rd == 32) return 0;
            h->rd[h->n_rd++] = r->buf[s];
        }
    }
    return 1;
}

/* does r read what ran since the last barrier wrote, or overwrite what it read or wrote? */
static int vk_need_barrier(vk_hazard *h, const vk_rec *r) {
    int need = 0;
    for (int s = 0; s < VK_NB && !need; s++) {
        if (!r->buf[s]) continue;
        if (vk_in(h->wr, h->n_wr, r->buf[s])) need = 1;
        if (((r->wmask >> s) & 1) && vk_in(h->rd, h->n_rd, r->buf[s])) need = 1;
    }
    if (!need && vk_hazard_add(h, r)) return 0;
    h->n_wr = h->n_rd = 0;
    vk_hazard_add(h, r);
    return 1;
}

static void vk_cmd_barrier(const vk_fns *f, VkCommandBuffer cb) {
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT,
                          VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
    VkFlags st = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT;
    f->CmdPipelineBarrier(cb, st, st, 0, 1, &mb, 0, NULL, 0, NULL);
}

static moe_status vk_record_cb(vk_ctx *c, VkCommandBuffer cb, const vk_rec *recs, int n) {
    moe_vk_backend *vk = c->vk;
    const vk_fns *f = &vk->f;
    VkCommandBufferBeginInfo bi = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO, NULL, 0, NULL};
    VkResult r = f->ResetCommandBuffer(cb, 0);
    if (r == VK_SUCCESS) r = f->BeginCommandBuffer(cb, &bi);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkBeginCommandBuffer failed (%s)", vk_result_str(r));
    int prof = c->profile && c->qpool && (uint32_t)n + 1 <= c->q_cap;
    if (prof) {
        f->CmdResetQueryPool(cb, c->qpool, 0, (uint32_t)n + 1);
        f->CmdWriteTimestamp(cb, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, c->qpool, 0);
    }
    /* the host wrote the step buffer (tokens, position) before the submit: covered by the submit.
       Device writes of earlier submissions (KV cache, kv_load copies) become visible here. */
    vk_cmd_barrier(f, cb);
    vk_hazard hz;
    hz.n_wr = hz.n_rd = 0;
    VkPipeline bound = 0;
    for (int i = 0; i < n; i++) {
        const vk_rec *rc = &recs[i];
        if (vk_need_barrier(&hz, rc) || prof || c->serial) vk_cmd_barrier(f, cb);
        if (rc->pipe == VK_REC_COPY) {
            VkBufferCopy cp = {rc->off[0], rc->off[1], rc->range[0]};
            f->CmdCopyBuffer(cb, rc->buf[0], rc->buf[1], 1, &cp);
        } else {
            VkPipeline pl = vk->pipes[rc->pipe][rc->var];
            if (pl != bound) {
                f->CmdBindPipeline(cb, VK_PIPELINE_BIND_POINT_COMPUTE, pl);
                bound = pl;
            }
            VkDescriptorBufferInfo bufs[VK_NB + VK_XBUFS + 1];
            VkWriteDescriptorSet wr[8];
            for (int s = 0; s < VK_NB; s++) {
                VkDescriptorBufferInfo d = {rc->buf[s] ? rc->buf[s] : vk->dummy.buf, rc->buf[s] ? rc->off[s] : 0,
                                            rc->buf[s] ? rc->range[s] : VK_WHOLE_SIZE};
                bufs[s] = d;
            }
            for (int j = 0; j < VK_XBUFS; j++) {
                VkDescriptorBufferInfo d = {vk->dummy.buf, 0, VK_WHOLE_SIZE};
                if (rc->wmode == 1 && j == 0) {
                    d.buffer = vk->win[rc->win].buf;
                    d.offset = rc->woff;
                    d.range = rc->wrange;
                } else if (rc->wmode == 2 && rc->win + (uint32_t)j < vk->n_win)
                    d.buffer = vk->win[rc->win + (uint32_t)j].buf;
                bufs[VK_NB + j] = d;
            }
            VkDescriptorBufferInfo sd = {c->step.buf, 0, VK_WHOLE_SIZE};
            bufs[VK_NB + VK_XBUFS] = sd;
            for (int b = 0; b < 8; b++) {
                VkWriteDescriptorSet w = {VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, NULL, 0, (uint32_t)b, 0, b == 6 ? VK_XBUFS : 1,
                                          VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, NULL, &bufs[b < 6 ? b : b == 6 ? VK_NB : VK_NB + VK_XBUFS], NULL};
                wr[b] = w;
            }
            f->CmdPushDescriptorSetKHR(cb, VK_PIPELINE_BIND_POINT_COMPUTE, vk->layout, 0, 8, wr);
            f->CmdPushConstants(cb, vk->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, 4 * VK_PC_WORDS, rc->pc);
            f->CmdDispatch(cb, rc->grid[0], rc->grid[1], rc->grid[2]);
        }
        if (prof) f->CmdWriteTimestamp(cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c->qpool, (uint32_t)i + 1);
    }
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_TRANSFER_WRITE_BIT | VK_ACCESS_SHADER_WRITE_BIT,
                          VK_ACCESS_HOST_READ_BIT};
    f->CmdPipelineBarrier(cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1,
                          &mb, 0, NULL, 0, NULL);
    r = f->EndCommandBuffer(cb);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkEndCommandBuffer failed (%s)", vk_result_str(r));
    return MOE_OK;
}

/* ---- profiling: GPU time per (class, kernel), prefill and decode steps apart ---- */
static void vk_prof_collect(vk_ctx *c, const vk_rec *recs, int n) {
    moe_vk_backend *vk = c->vk;
    if (!c->profile || !c->qpool || (uint32_t)n + 1 > c->q_cap) return;
    uint64_t *t = malloc(((size_t)n + 1) * sizeof *t);
    if (!t) return;
    VkResult r = vk->f.GetQueryPoolResults(vk->dev, c->qpool, 0, (uint32_t)n + 1, ((size_t)n + 1) * 8, t, 8,
                                           VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT);
    if (r == VK_SUCCESS) {
        int ph = c->step_n > 1 ? 0 : 1;
        for (int i = 0; i < n; i++) {
            double ns = (double)((t[i + 1] - t[i]) & vk->ts_mask) * vk->ts_ns;
            int p = recs[i].pipe == VK_REC_COPY ? VKP_COUNT : recs[i].pipe;
            c->prof_ns[ph][recs[i].kind][p] += ns;
            c->prof_n[ph][recs[i].kind][p]++;
        }
        c->prof_steps[ph]++;
        c->prof_tokens[ph] += (uint64_t)c->step_n;
        c->prof_total[ph] += (double)((t[n] - t[0]) & vk->ts_mask) * vk->ts_ns;
    }
    free(t);
}

static void vk_prof_report(vk_ctx *c) {
    for (int ph = 0; ph < 2; ph++) {
        if (!c->prof_steps[ph]) continue;
        double tot = c->prof_total[ph];
        vk_log(c->vk, MOE_LOG_INFO, "vk profile, %s: %llu steps, %llu tokens, GPU %.3f ms (%.3f ms/step), dispatches serialized",
               ph ? "decode" : "prefill", (unsigned long long)c->prof_steps[ph], (unsigned long long)c->prof_tokens[ph], tot / 1e6,
               tot / 1e6 / (double)c->prof_steps[ph]);
        for (;;) { /* largest first; entries are cleared as they are printed */
            int bk = -1, bp = -1;
            for (int k = 0; k < VKC_COUNT; k++)
                for (int p = 0; p <= VKP_COUNT; p++)
                    if (c->prof_n[ph][k][p] && (bk < 0 || c->prof_ns[ph][k][p] > c->prof_ns[ph][bk][bp])) bk = k, bp = p;
            if (bk < 0) break;
            char name[48] = "copy";
            if (bp < VKP_ADD) snprintf(name, sizeof name, "%s_%s", k_vk_kind_names[bp / VKT_COUNT], k_vk_type_names[bp % VKT_COUNT]);
            else if (bp < VKP_COUNT) snprintf(name, sizeof name, "%s", k_vk_plain[bp - VKP_ADD].name);
            double ns = c->prof_ns[ph][bk][bp];
            vk_log(c->vk, MOE_LOG_INFO, "vk profile, %s: %5.1f%% %10.3f ms  %-22s %-12s x%u", ph ? "decode" : "prefill", tot > 0 ? 100.0 * ns / tot : 0.0,
                   ns / 1e6, k_vkc_names[bk], name, c->prof_n[ph][bk][bp]);
            c->prof_n[ph][bk][bp] = 0;
        }
    }
}

/* ---- step bracket ---- */
static void vk_begin_step(void *be) {
    vk_ctx *c = be;
    c->n_recs = 0;
    c->have_pos0 = 0;
    c->step_pos0 = 0;
    c->step_n = 0;
    c->logit_rows = 0;
    c->step_evals = 0;
    c->fuse_idx = -1;
    c->pn.active = 0;
    c->err = MOE_OK;
    if (c->dead) vk_ctx_fail(c, MOE_ERR_DEVICE, "Vulkan: the device was lost earlier; this context cannot run");
}

static moe_status vk_end_step(void *be) {
    vk_ctx *c = be;
    moe_vk_backend *vk = c->vk;
    vk_pn_flush(c);
    if (!c->err && c->logit_rows) {
        vk_rec *r = vk_rec_new(c, VK_REC_COPY, VKC_COPY);
        if (r) {
            vk_bind_range(r, 0, c->act[ACT_LOGITS].buf, 0, (VkDeviceSize)c->logit_rows * (VkDeviceSize)c->w->hp.n_vocab * 4, 0);
            vk_bind_range(r, 1, c->logits.buf, 0, 0, 1);
        }
    }
    if (c->err) {
        moe_internal_set_error(c->err, "%s", c->errmsg);
        moe_status st = c->err;
        c->err = MOE_OK;
        return st;
    }
    uint32_t *sp = (uint32_t *)c->step.map;
    sp[0] = (uint32_t)c->step_pos0;
    sp[1] = (uint32_t)c->step_n;
    size_t bytes = (size_t)c->n_recs * sizeof(vk_rec);
    vk_cached *hit = NULL, *victim = &c->cache[0];
    for (int i = 0; i < VK_CACHE; i++) {
        vk_cached *e = &c->cache[i];
        if (e->n == c->n_recs && e->recs && !memcmp(e->recs, c->recs, bytes)) hit = e;
        if (e->used < victim->used) victim = e;
    }
    if (!hit) {
        hit = victim;
        hit->n = -1;
        moe_status st = vk_record_cb(c, hit->cb, c->recs, c->n_recs);
        if (st) return st;
        vk_rec *copy = realloc(hit->recs, bytes ? bytes : 1);
        if (copy) { /* without the copy the command buffer still runs, it is just not found again */
            memcpy(copy, c->recs, bytes);
            hit->recs = copy;
            hit->n = c->n_recs;
        }
    }
    hit->used = ++c->tick;
    moe_status st = vk_submit(vk, hit->cb, c->fence, "step");
    if (st) return st;
    VkResult r = vk->f.WaitForFences(vk->dev, 1, &c->fence, 1, 600ull * 1000000000ull);
    if (r == VK_SUCCESS) r = vk->f.ResetFences(vk->dev, 1, &c->fence);
    if (r != VK_SUCCESS) {
        if (r == VK_ERROR_DEVICE_LOST || r == VK_TIMEOUT) c->dead = 1;
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: the step failed on the device (%s)", vk_result_str(r));
    }
    vk_prof_collect(c, c->recs, c->n_recs);
    c->expert_evals += c->step_evals;
    return MOE_OK;
}

static void vk_read_logits(void *be, float *dst, int n) {
    vk_ctx *c = be;
    memcpy(dst, c->logits.map, (size_t)n * (size_t)c->w->hp.n_vocab * sizeof(float));
}

/* copies, per cache, the K then V rows of the positions it holds among [0, n_pos) between host
   and device, in position order (the CPU backend's layout) */
static moe_status vk_kv_copy(vk_ctx *c, uint8_t *host, int n_pos, int download) {
    const moe_weights *w = c->w;
    if (c->dead) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the device was lost earlier; this context cannot run");
    if (n_pos <= 0) return MOE_OK;
    vk_xfer x;
    moe_status st = vk_xfer_begin(c->vk, &x, (VkDeviceSize)8 << 20, download);
    if (st) return st;
    for (int i = 0; i < w->hp.n_cache; i++) {
        VkDeviceSize rb = (VkDeviceSize)w->caches[i].kv_width * (c->kv_f16 ? 2 : 4);
        int rows = c->kv_rows[i], p0 = n_pos > rows ? n_pos - rows : 0;
        for (int kv = 0; kv < 2; kv++)
            for (int p = p0; p < n_pos;) { /* runs of positions that are contiguous in the ring */
                int run = rows - p % rows < n_pos - p ? rows - p % rows : n_pos - p;
                VkDeviceSize bytes = (VkDeviceSize)run * rb;
                vk_xfer_copy(&x, host, bytes, kv ? c->vc.buf : c->kc.buf, c->kv_off[i] + (VkDeviceSize)(p % rows) * rb);
                host += bytes;
                p += run;
            }
    }
    return vk_xfer_end(&x);
}
static moe_status vk_kv_save(void *be, void *dst, int n_pos) { return vk_kv_copy(be, dst, n_pos, 1); }
static moe_status vk_kv_load(void *be, const void *src, int n_pos) { return vk_kv_copy(be, (uint8_t *)(uintptr_t)src, n_pos, 0); }

void moe_vk_ctx_free(void *be) {
    vk_ctx *c = be;
    if (!c) return;
    moe_vk_backend *vk = c->vk;
    if (c->profile) vk_prof_report(c);
    if (c->fence) vk->f.DestroyFence(vk->dev, c->fence, NULL);
    if (c->qpool) vk->f.DestroyQueryPool(vk->dev, c->qpool, NULL);
    if (c->pool) vk->f.DestroyCommandPool(vk->dev, c->pool, NULL); /* frees the command buffers */
    for (int i = 0; i < ACT_COUNT; i++) vk_buf_free(vk, &c->act[i]);
    vk_buf *bufs[] = {&c->h, &c->p, &c->aux, &c->kc, &c->vc, &c->step, &c->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) vk_buf_free(vk, bufs[i]);
    for (int i = 0; i < c->n_rope; i++) vk_buf_free(vk, &c->rope[i].tab);
    free(c->kv_off);
    free(c->kv_size);
    free(c->kv_rows);
    for (int i = 0; i < VK_CACHE; i++) free(c->cache[i].recs);
    free(c->recs);
    free(c);
}

static moe_status vk_act_new(vk_ctx *c, vk_buf *b, VkDeviceSize bytes, const char *what) {
    if (bytes > c->vk->props.limits.maxStorageBufferRange)
        return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: the %s buffer needs %.1f MiB, more than one storage binding (%u MiB) holds: use a smaller n_batch",
                       what, (double)bytes / 1048576.0, c->vk->props.limits.maxStorageBufferRange >> 20);
    return vk_buf_new(c->vk, b, bytes, VK_MEM_DEVICE, what);
}

moe_status moe_vk_ctx_new(moe_vk_backend *vk, const moe_ctx_shape *shape, void **be_out) {
    if (!be_out) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_ctx_new: be_out is NULL");
    *be_out = NULL;
    if (!vk || !shape || shape->n_ctx <= 0 || shape->n_batch <= 0) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_ctx_new: bad arguments");
    const moe_hparams *hp = &vk->w->hp;
    if (shape->n_batch > 65535) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: n_batch %d is above 65535", shape->n_batch);
    vk_ctx *c = calloc(1, sizeof *c);
    if (!c) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    c->vk = vk;
    c->w = vk->w;
    c->shape = *shape;
    c->kv_f16 = shape->kv_type == MOE_KV_F16;
    c->serial = vk_env_on("MOE_VK_SERIAL"); /* debugging: a barrier between every two dispatches */
    moe_status st = MOE_OK;
    const VkDeviceSize nb = (VkDeviceSize)shape->n_batch, k = (VkDeviceSize)hp->n_expert_used;
    const VkDeviceSize widths[ACT_COUNT] = {
        (VkDeviceSize)hp->n_embd, (VkDeviceSize)hp->n_embd, (VkDeviceSize)hp->n_head * (VkDeviceSize)hp->head_dim,
        (VkDeviceSize)hp->n_head_kv * (VkDeviceSize)hp->head_dim, (VkDeviceSize)hp->n_head_kv * (VkDeviceSize)hp->head_dim,
        (VkDeviceSize)hp->n_head * (VkDeviceSize)hp->head_dim, (VkDeviceSize)hp->n_embd, (VkDeviceSize)hp->n_expert,
        (VkDeviceSize)hp->n_vocab,
        /* hybrid models (Gated DeltaNet): not on Vulkan yet (moe_vk_init refuses them) */
        1, 1, 1, 1, 1, 1};
    static const char *const act_names[ACT_COUNT] = {"x", "xn", "q", "k", "v", "attn", "out", "router", "logits",
                                                     "dn qkv", "dn conv", "dn z", "dn beta", "dn alpha", "dn o"};
    VkDeviceSize logit_rows = shape->logits_all ? nb : 1;
    for (int i = 0; i < ACT_COUNT && !st; i++) st = vk_act_new(c, &c->act[i], (i == ACT_LOGITS ? logit_rows : nb) * widths[i] * 4, act_names[i]);
    if (!st) st = vk_act_new(c, &c->h, nb * k * (VkDeviceSize)hp->n_ff_exp * 4, "expert hidden");
    if (!st) st = vk_act_new(c, &c->p, (nb > VK_MV_MAX ? nb * k : 1) * (VkDeviceSize)hp->n_embd * 4, "expert output");
    c->max_items = (uint32_t)((nb * k + 63) / 64 + (VkDeviceSize)hp->n_expert);
    c->ids_off = 0;
    c->w_off = (uint32_t)(nb * k);
    c->list_off = (uint32_t)(2 * nb * k);
    c->pos_off = (uint32_t)(3 * nb * k);
    c->items_off = (uint32_t)(4 * nb * k);
    if (!st) st = vk_act_new(c, &c->aux, ((VkDeviceSize)c->items_off + 4 + 4 * (VkDeviceSize)c->max_items) * 4, "routing");
    /* KV caches, each at an aligned offset of one K and one V buffer */
    size_t n_cache = (size_t)(hp->n_cache ? hp->n_cache : 1);
    c->kv_off = calloc(n_cache, sizeof *c->kv_off);
    c->kv_size = calloc(n_cache, sizeof *c->kv_size);
    c->kv_rows = calloc(n_cache, sizeof *c->kv_rows);
    if (!st && (!c->kv_off || !c->kv_size || !c->kv_rows)) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    VkDeviceSize kv_total = 0;
    for (int i = 0; !st && i < hp->n_cache; i++) {
        c->kv_rows[i] = moe_cache_rows(&c->w->caches[i], shape->n_ctx, shape->n_batch);
        c->kv_size[i] = vk_align_up((VkDeviceSize)c->kv_rows[i] * (VkDeviceSize)c->w->caches[i].kv_width * (c->kv_f16 ? 2 : 4), VK_ALIGN);
        c->kv_off[i] = kv_total;
        kv_total += c->kv_size[i];
        if (c->kv_size[i] > vk->props.limits.maxStorageBufferRange)
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: one layer of KV cache (n_ctx %d) exceeds a storage binding", shape->n_ctx);
    }
    if (!st) st = vk_buf_new(vk, &c->kc, kv_total ? kv_total : VK_ALIGN, VK_MEM_DEVICE, "the K cache");
    if (!st) st = vk_buf_new(vk, &c->vc, kv_total ? kv_total : VK_ALIGN, VK_MEM_DEVICE, "the V cache");
    /* RoPE tables exactly as the CPU backend computes the angles: inv_freq in f32, angle =
       f32(pos · inv_freq); one per distinct rope among the layers */
    for (int l = 0; !st && l < hp->n_layer; l++) {
        const moe_layer_plan *lp = &c->w->layers[l].p;
        if (lp->attn_kind != MOE_ATTN_FULL && lp->attn_kind != MOE_ATTN_SLIDING) continue;
        int have = 0;
        for (int i = 0; i < c->n_rope && !have; i++) have = !memcmp(&c->rope[i].r, &lp->rope, sizeof lp->rope);
        if (have) continue;
        if (c->n_rope == VK_MAX_ROPES) {
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: more than %d rope settings among the layers", VK_MAX_ROPES);
            break;
        }
        const moe_rope *rp = &lp->rope;
        int half = rp->n_rot / 2;
        VkDeviceSize rope_bytes = (VkDeviceSize)shape->n_ctx * (VkDeviceSize)(half ? half : 1) * 8;
        c->rope[c->n_rope].r = *rp;
        if ((st = vk_act_new(c, &c->rope[c->n_rope].tab, rope_bytes, "rope table"))) break;
        vk_buf *tb = &c->rope[c->n_rope++].tab;
        float *tab = malloc(rope_bytes);
        if (!tab) {
            st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
            break;
        }
        for (int p = 0; p < half; p++) {
            float inv_freq = (float)(1.0 / pow((double)rp->base, (double)(2 * p) / (double)rp->freq_dim));
            for (int pos = 0; pos < shape->n_ctx; pos++) {
                float ang = (float)pos * inv_freq;
                size_t at = 2 * ((size_t)pos * (size_t)half + (size_t)p);
                tab[at] = p < rp->n_freq ? cosf(ang) : 1.0f;
                tab[at + 1] = p < rp->n_freq ? sinf(ang) : 0.0f;
            }
        }
        vk_xfer x;
        if (!(st = vk_xfer_begin(vk, &x, (VkDeviceSize)8 << 20, 0))) {
            vk_xfer_copy(&x, (uint8_t *)tab, rope_bytes, tb->buf, 0);
            st = vk_xfer_end(&x);
        }
        free(tab);
    }
    if (!st) st = vk_buf_new(vk, &c->step, (4 + nb) * 4, VK_MEM_HOST, "the step buffer");
    if (!st) st = vk_buf_new(vk, &c->logits, logit_rows * (VkDeviceSize)hp->n_vocab * 4, VK_MEM_HOST_READ, "the logits readback");
    if (!st) {
        memset(c->step.map, 0, (size_t)c->step.size);
        VkCommandPoolCreateInfo pci = {VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, NULL, VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, vk->qfam};
        VkResult r = vk->f.CreateCommandPool(vk->dev, &pci, NULL, &c->pool);
        VkCommandBuffer cbs[VK_CACHE];
        VkCommandBufferAllocateInfo cai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, NULL, c->pool, VK_COMMAND_BUFFER_LEVEL_PRIMARY, VK_CACHE};
        if (r == VK_SUCCESS) r = vk->f.AllocateCommandBuffers(vk->dev, &cai, cbs);
        for (int i = 0; i < VK_CACHE && r == VK_SUCCESS; i++) c->cache[i].cb = cbs[i];
        VkFenceCreateInfo fci = {VK_STRUCTURE_TYPE_FENCE_CREATE_INFO, NULL, 0};
        if (r == VK_SUCCESS) r = vk->f.CreateFence(vk->dev, &fci, NULL, &c->fence);
        if (r == VK_SUCCESS && vk_env_on("MOE_VK_PROFILE")) {
            if (!vk->timestamps) vk_log(vk, MOE_LOG_WARN, "MOE_VK_PROFILE: this queue has no timestamps");
            else {
                VkQueryPoolCreateInfo qci = {VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO, NULL, 0, VK_QUERY_TYPE_TIMESTAMP, 8192, 0};
                r = vk->f.CreateQueryPool(vk->dev, &qci, NULL, &c->qpool);
                c->q_cap = 8192;
                c->profile = 1;
            }
        }
        if (r != VK_SUCCESS) st = vk_fail(MOE_ERR_DEVICE, "Vulkan: creating the context's command pool failed (%s)", vk_result_str(r));
    }
    if (st) {
        moe_vk_ctx_free(c);
        return st;
    }
    *be_out = c;
    return MOE_OK;
}

/* ============================================================================================ */
/* 7. ops                                                                                        */
/* ============================================================================================ */
static uint32_t vk_f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static uint32_t vk_div_up(uint64_t a, uint64_t b) { return (uint32_t)((a + b - 1) / b); }

/* the device placement of a weight, or a failure */
static const vk_wt *vk_wt_of(vk_ctx *c, const moe_weight *w) {
    if (!w || !w->dev) {
        vk_ctx_fail(c, MOE_ERR_INVALID_ARG, "Vulkan: weight '%s' is not on the device", w && w->name ? w->name : "?");
        return NULL;
    }
    return w->dev;
}

static void vk_bind_part(vk_rec *r, const vk_part *p) {
    r->wmode = 1;
    r->win = p->win;
    r->woff = p->off;
    r->wrange = p->bytes + VK_PAD;
}

/* a record that writes all n rows of role with a kernel that can add instead (acc word) */
static void vk_mark_fusable(vk_ctx *c, int role, int n, int acc_word) {
    c->fuse_idx = c->n_recs - 1;
    c->fuse_role = role;
    c->fuse_rows = n;
    c->fuse_acc = acc_word;
}

static int32_t vk_pos_delta(vk_ctx *c, int pos0) {
    if (!c->have_pos0) {
        c->have_pos0 = 1;
        c->step_pos0 = pos0;
    }
    return pos0 - c->step_pos0;
}

static void vk_op_embed(void *be, int dst, const moe_weight *w, const moe_token *tokens, int n) {
    vk_ctx *c = be;
    const vk_wt *wt = vk_wt_of(c, w);
    if (!wt || c->err) return;
    if (n > c->shape.n_batch) {
        vk_ctx_fail(c, MOE_ERR_INVALID_ARG, "Vulkan: %d tokens in a step of at most %d", n, c->shape.n_batch);
        return;
    }
    vk_pn_touch(c, 0, 1u << dst);
    uint32_t *sp = (uint32_t *)c->step.map;
    for (int i = 0; i < n; i++) sp[4 + i] = (uint32_t)tokens[i];
    c->step_n = n;
    int t = vk_type_index(w->type);
    uint32_t K = (uint32_t)w->ne[0];
    for (uint32_t j = 0; j < wt->n_parts; j++) {
        const vk_part *p = &c->vk->parts[wt->part0 + j];
        vk_rec *r = vk_rec_new(c, VKP_TYPED(VKK_EMBED, t), VKC_EMBED);
        if (!r) return;
        vk_bind(r, 1, &c->act[dst], 1);
        vk_bind_part(r, p);
        r->pc[0] = K;
        r->pc[1] = (uint32_t)w->row_bytes;
        r->pc[2] = (uint32_t)p->row_lo;
        r->pc[3] = (uint32_t)p->row_hi;
        r->grid[0] = vk_div_up(K, 16u * k_vk_kind_wg[VKK_EMBED]);
        r->grid[1] = (uint32_t)n;
        r->grid[2] = 1;
    }
    c->fuse_idx = -1;
}

static void vk_emit_rmsnorm(vk_ctx *c, int dst, int src, const moe_weight *w, int n_rows, int width, float eps) {
    const vk_wt *wt = w ? vk_wt_of(c, w) : NULL;
    if (c->err || n_rows <= 0) return;
    vk_rec *r = vk_rec_new(c, VKP_RMSNORM, VKC_NORM);
    if (!r) return;
    vk_bind(r, 0, &c->act[src], 0);
    vk_bind(r, 1, &c->act[dst], 1);
    if (wt) {
        const vk_part *p = &c->vk->parts[wt->part0];
        vk_bind_range(r, 2, c->vk->win[p->win].buf, p->off, p->bytes, 0);
    }
    r->pc[0] = (uint32_t)width;
    r->pc[1] = wt != NULL;
    r->pc[2] = (uint32_t)n_rows;
    r->pc[3] = vk_f2u(eps);
    vk_grid_fold(r, (uint64_t)n_rows, 1);
    c->fuse_idx = -1;
}

/* the pending norm becomes a dispatch (unless a consumer already wrote its output) and ends */
static void vk_pn_flush(vk_ctx *c) {
    if (c->pn.active && !c->pn.done) {
        c->pn.active = 0;
        vk_emit_rmsnorm(c, c->pn.dst, c->pn.src, c->pn.w, c->pn.rows, c->pn.width, c->pn.eps);
    }
    c->pn.active = 0;
}

/* before an op that reads the roles in mask rd and writes those in wr */
static void vk_pn_touch(vk_ctx *c, unsigned rd, unsigned wr) {
    if (!c->pn.active) return;
    unsigned d = 1u << c->pn.dst, s = 1u << c->pn.src;
    if (((rd & d) && !c->pn.done) || (wr & (d | s))) vk_pn_flush(c);
}

/* binds the pending norm into a matrix-vector record (x from src, weight at slot 4, output at 5) */
static void vk_pn_inline(vk_ctx *c, vk_rec *r) {
    const vk_wt *wt = c->pn.w->dev;
    const vk_part *p = &c->vk->parts[wt->part0];
    vk_bind(r, 0, &c->act[c->pn.src], 0);
    vk_bind_range(r, 4, c->vk->win[p->win].buf, p->off, p->bytes, 0);
    r->pc[16] = vk_f2u(c->pn.eps);
    r->pc[17] = 1;
    if (!c->pn.done) {
        vk_bind(r, 5, &c->act[c->pn.dst], 1);
        r->pc[17] |= 2;
        c->pn.done = 1;
    }
}

static void vk_op_rmsnorm(void *be, int dst, int src, const moe_weight *w, int n_rows, int width, float eps) {
    vk_ctx *c = be;
    if (c->err || n_rows <= 0) return;
    vk_pn_touch(c, 1u << src, 1u << dst);
    const vk_wt *wt = w ? vk_wt_of(c, w) : NULL;
    if (wt && n_rows <= VK_MV_MAX && dst != src && width % 16 == 0 && wt->n_parts == 1) {
        c->pn.active = 1;
        c->pn.done = 0;
        c->pn.dst = dst;
        c->pn.src = src;
        c->pn.rows = n_rows;
        c->pn.width = width;
        c->pn.w = w;
        c->pn.eps = eps;
        c->fuse_idx = -1;
        return;
    }
    vk_emit_rmsnorm(c, dst, src, w, n_rows, width, eps);
}

static void vk_op_matmul(void *be, int dst, const moe_weight *w, int src, int src_row0, int n) {
    vk_ctx *c = be;
    const vk_wt *wt = vk_wt_of(c, w);
    if (!wt || c->err || n <= 0) return;
    int t = vk_type_index(w->type);
    uint32_t K = (uint32_t)w->ne[0], M = (uint32_t)w->ne[1];
    int mv = n <= VK_MV_MAX;
    int inl = mv && c->pn.active && src == c->pn.dst && src_row0 + n <= c->pn.rows && (int)K == c->pn.width && wt->n_parts == 1;
    if (!inl) vk_pn_touch(c, 1u << src, 1u << dst);
    int kind = dst == ACT_LOGITS ? VKC_LMHEAD : mv ? VKC_MV : VKC_MM;
    if (dst == ACT_LOGITS && n > c->logit_rows) c->logit_rows = n;
    for (uint32_t j = 0; j < wt->n_parts; j++) {
        const vk_part *p = &c->vk->parts[wt->part0 + j];
        uint32_t Mp = (uint32_t)(p->row_hi - p->row_lo);
        /* f16 tensor cores round both operands to 11 bits: never for f32 weights (the router,
           whose top-k choice must not flip) */
        int cm = c->vk->coopmat && w->type != MOE_TYPE_F32 && dst != ACT_ROUTER;
        int pipe = VKP_TYPED(mv ? VKK_MV : cm ? VKK_MMCM : VKK_MM, t);
        vk_rec *r = vk_rec_new(c, pipe, kind);
        if (!r) return;
        vk_bind(r, 0, &c->act[src], 0);
        vk_bind(r, 1, &c->act[dst], 1);
        vk_bind_part(r, p);
        uint32_t nblk = vk_div_up(Mp, mv ? VK_MV_ROWS : 64);
        uint32_t pc[16] = {K, Mp, (uint32_t)w->row_bytes, nblk, (uint32_t)src_row0 * K, K, (uint32_t)p->row_lo, M,
                           0, 0, 0, 0, mv ? 0 : (uint32_t)n, 0, 0, 0};
        memcpy(r->pc, pc, sizeof pc);
        if (inl) vk_pn_inline(c, r);
        vk_grid_fold(r, nblk, mv ? (uint32_t)n : vk_div_up((uint64_t)n, 64));
    }
    if (inl) vk_pn_touch(c, 0, 1u << dst);
    c->fuse_idx = -1;
    if (wt->n_parts == 1) vk_mark_fusable(c, dst, n, 9);
}

static void vk_op_rope(void *be, int buf, int n, int n_head, int head_dim, const moe_rope *rope, int pos0) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    const vk_buf *tab = NULL;
    for (int i = 0; i < c->n_rope && !tab; i++)
        if (!memcmp(&c->rope[i].r, rope, sizeof *rope)) tab = &c->rope[i].tab;
    if (!tab) {
        vk_ctx_fail(c, MOE_ERR_UNSUPPORTED, "Vulkan: rope with %d dims / base %g is none of the model's tables", rope->n_rot, (double)rope->base);
        return;
    }
    vk_pn_touch(c, 1u << buf, 1u << buf);
    int32_t pd = vk_pos_delta(c, pos0);
    VkBuffer b = c->act[buf].buf;
    int hw = c->kv_f16 ? VKP_HEADWISE_F16 : VKP_HEADWISE_F32;
    /* fuse with a per-head RMSNorm of the same buffer recorded just before (q_norm / k_norm) */
    vk_rec *r = NULL;
    for (int i = c->n_recs - 1; i >= 0 && i >= c->n_recs - 3; i--) {
        vk_rec *q = &c->recs[i];
        if (q->pipe == VKP_RMSNORM && q->buf[0] == b && q->buf[1] == b && q->pc[0] == (uint32_t)head_dim && q->pc[1] &&
            q->pc[2] == (uint32_t)(n * n_head)) {
            r = q;
            break;
        }
        int touches = 0;
        for (int s = 0; s < VK_NB; s++) touches |= q->buf[s] == b;
        if (touches || q->pipe == VK_REC_COPY) break;
    }
    if (r) {
        uint32_t eps = r->pc[3];
        r->pipe = (uint16_t)hw;
        r->kind = VKC_ROPE;
        VkPipeline pl;
        int var;
        moe_status st = vk_pipe(c->vk, hw, 0, &pl, &var);
        if (st) {
            vk_ctx_fail(c, st, "%s", moe_last_error());
            return;
        }
        r->var = (uint8_t)var;
        memset(r->pc, 0, sizeof r->pc);
        r->pc[3] = 3;
        r->pc[4] = eps;
        r->buf[1] = 0; /* headwise works in place on binding 0 */
        r->off[1] = r->range[1] = 0;
        r->wmask = 1;
    } else {
        r = vk_rec_new(c, hw, VKC_ROPE);
        if (!r) return;
        vk_bind(r, 0, &c->act[buf], 1);
        r->pc[3] = 2;
    }
    vk_bind(r, 3, tab, 0);
    r->pc[0] = (uint32_t)n_head;
    r->pc[1] = (uint32_t)head_dim;
    r->pc[2] = (uint32_t)rope->n_rot;
    r->pc[6] = (uint32_t)pd;
    r->grid[0] = (uint32_t)n_head;
    r->grid[1] = (uint32_t)n;
    r->grid[2] = 1;
    c->fuse_idx = -1;
}

static void vk_op_attention(void *be, const moe_attn *a, int n, int pos0) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    if (a->window || !a->store) {
        vk_ctx_fail(c, MOE_ERR_UNSUPPORTED, "Vulkan: sliding-window and KV-shared attention are not implemented yet");
        return;
    }
    vk_pn_touch(c, (1u << ACT_Q) | (1u << ACT_K) | (1u << ACT_V), 1u << ACT_ATTN);
    int32_t pd = vk_pos_delta(c, pos0);
    uint32_t kvw = (uint32_t)(a->n_head_kv * a->head_dim);
    VkDeviceSize lo = c->kv_off[a->cache], sz = c->kv_size[a->cache];
    /* the cache store rides on the K heads' norm/rope dispatch recorded just before, if any */
    int hw = c->kv_f16 ? VKP_HEADWISE_F16 : VKP_HEADWISE_F32;
    for (int i = c->n_recs - 1; i >= 0 && i >= c->n_recs - 2; i--) {
        vk_rec *q = &c->recs[i];
        if (q->pipe == hw && q->buf[0] == c->act[ACT_K].buf && q->grid[0] == (uint32_t)a->n_head_kv && q->grid[1] == (uint32_t)n &&
            q->pc[6] == (uint32_t)pd && !(q->pc[3] & 12u)) {
            vk_bind(q, 1, &c->act[ACT_V], 0);
            vk_bind_range(q, 4, c->kc.buf, lo, sz, 1);
            vk_bind_range(q, 5, c->vc.buf, lo, sz, 1);
            q->pc[3] |= 12u;
            q->pc[5] = kvw;
            goto attend;
        }
    }
    vk_rec *r = vk_rec_new(c, c->kv_f16 ? VKP_KVSTORE_F16 : VKP_KVSTORE_F32, VKC_KVSTORE);
    if (!r) return;
    vk_bind(r, 0, &c->act[ACT_K], 0);
    vk_bind(r, 1, &c->act[ACT_V], 0);
    vk_bind_range(r, 4, c->kc.buf, lo, sz, 1);
    vk_bind_range(r, 5, c->vc.buf, lo, sz, 1);
    r->pc[0] = kvw;
    r->pc[1] = (uint32_t)pd;
    r->grid[0] = vk_div_up(kvw, 2u * k_vk_plain[VKP_KVSTORE_F16 - VKP_ADD].wg);
    r->grid[1] = (uint32_t)n;
    r->grid[2] = 2;
attend:
    r = vk_rec_new_spec(c, c->kv_f16 ? VKP_ATTN_F16 : VKP_ATTN_F32, (uint32_t)a->head_dim, VKC_ATTN);
    if (!r) return;
    vk_bind(r, 0, &c->act[ACT_Q], 0);
    vk_bind(r, 1, &c->act[ACT_ATTN], 1);
    vk_bind_range(r, 4, c->kc.buf, lo, sz, 0);
    vk_bind_range(r, 5, c->vc.buf, lo, sz, 0);
    r->pc[0] = (uint32_t)a->n_head;
    r->pc[1] = (uint32_t)a->n_head_kv;
    r->pc[2] = (uint32_t)a->head_dim;
    r->pc[3] = kvw;
    r->pc[4] = vk_f2u(a->scale);
    r->pc[5] = (uint32_t)pd;
    r->grid[0] = (uint32_t)a->n_head;
    r->grid[1] = (uint32_t)n;
    r->grid[2] = 1;
    c->fuse_idx = -1;
}

static void vk_op_add(void *be, int dst, int src, int n, int width) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, (1u << src) | (1u << dst), 1u << dst);
    /* fold into the kernel that just wrote src: it adds into dst instead (residual adds) */
    if (c->fuse_idx >= 0 && c->fuse_idx == c->n_recs - 1 && c->fuse_role == src && c->fuse_rows == n && dst != src &&
        c->act[src].size == c->act[dst].size) {
        vk_rec *r = &c->recs[c->fuse_idx];
        vk_bind(r, 1, &c->act[dst], 1);
        r->pc[c->fuse_acc] = 1;
        c->fuse_idx = -1;
        return;
    }
    vk_rec *r = vk_rec_new(c, VKP_ADD, VKC_ADD);
    if (!r) return;
    vk_bind(r, 0, &c->act[src], 0);
    vk_bind(r, 1, &c->act[dst], 1);
    uint64_t count = (uint64_t)n * (uint64_t)width;
    r->pc[0] = (uint32_t)count;
    vk_grid_fold(r, vk_div_up(count, k_vk_plain[0].wg), 1);
    c->fuse_idx = -1;
}

/* route: router logits (a matmul into ACT_ROUTER), then on the GPU the softmax, top-k and
   renormalisation per token; for matmul-size steps also the grouping of (token, slot) pairs by
   expert into work items. The choice stays on the device. */
static void vk_op_route(void *be, const moe_weight *router, const moe_route *rt, int src, int n) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    if (router) vk_op_matmul(be, ACT_ROUTER, router, src, 0, n);
    vk_pn_touch(c, 1u << ACT_ROUTER, 0);
    uint32_t E = (uint32_t)rt->n_expert, k = (uint32_t)rt->k;
    c->route_k = k;
    c->route_n = n;
    vk_rec *r = vk_rec_new(c, VKP_TOPK, VKC_TOPK);
    if (!r) return;
    vk_bind(r, 2, &c->aux, 1);
    vk_bind(r, 5, &c->act[ACT_ROUTER], 0);
    uint32_t tpc[6] = {E, k, (uint32_t)rt->norm, 0, c->ids_off, c->w_off};
    memcpy(r->pc, tpc, sizeof tpc);
    r->grid[0] = (uint32_t)n;
    r->grid[1] = r->grid[2] = 1;
    if (n > VK_MV_MAX) { /* group the (token, slot) pairs by expert into work items */
        r = vk_rec_new(c, VKP_MOE_SORT, VKC_SORT);
        if (!r) return;
        vk_bind(r, 2, &c->aux, 1);
        uint32_t spc[6] = {E, (uint32_t)n * k, c->ids_off, c->list_off, c->pos_off, c->items_off};
        memcpy(r->pc, spc, sizeof spc);
        r->grid[0] = r->grid[1] = r->grid[2] = 1;
    }
    c->fuse_idx = -1;
}

/* expert gate and up of every routed pair into h: fused when both have one type (mode 1),
   else gate (mode 3) then up (mode 4); the kernels apply the activation */
static void vk_op_experts_glu(void *be, const moe_weight *gate, const moe_weight *up, int act, int src, int n) {
    vk_ctx *c = be;
    const vk_wt *wg = vk_wt_of(c, gate), *wu = vk_wt_of(c, up);
    if (!wg || !wu || c->err || n <= 0) return;
    if (act != MOE_ACT_SILU) {
        vk_ctx_fail(c, MOE_ERR_UNSUPPORTED, "Vulkan: expert activation %d is not implemented yet", act);
        return;
    }
    moe_vk_backend *vk = c->vk;
    uint32_t k = (uint32_t)c->route_k, ff = (uint32_t)gate->ne[1], D = (uint32_t)gate->ne[0];
    int tg = vk_type_index(gate->type), tu = vk_type_index(up->type);
    int inl = n <= VK_MV_MAX && c->pn.active && src == c->pn.dst && n <= c->pn.rows && (int)D == c->pn.width;
    c->step_evals += (uint64_t)n * k;
    vk_pn_touch(c, inl ? 0u : 1u << src, 0);
    int mv = n <= VK_MV_MAX;
    int mmk = vk->coopmat ? VKK_MMCM : VKK_MM, mmgk = vk->coopmat ? VKK_MMCMG : VKK_MMG;
    for (int pass = 0; pass < (tg == tu ? 1 : 2); pass++) {
        int mode = tg == tu ? 1 : pass == 0 ? 3 : 4;
        int t = mode == 4 ? tu : tg;
        const moe_weight *mw = mode == 4 ? up : gate;
        int pipe = VKP_TYPED(mv ? VKK_MV : mode == 1 ? mmgk : mmk, t);
        vk_rec *r = vk_rec_new(c, pipe, mv ? VKC_MV_GATEUP : VKC_MM_GATEUP);
        if (!r) return;
        vk_bind(r, 0, &c->act[src], 0);
        vk_bind(r, 1, &c->h, 1);
        vk_bind(r, 2, &c->aux, 0);
        vk_bind(r, 3, &vk->tables, 0);
        r->wmode = 2;
        r->win = wg->win0;
        uint32_t nblk = vk_div_up(ff, mv ? VK_MV_ROWS : 64);
        uint32_t pc[16] = {D, ff, (uint32_t)mw->row_bytes, nblk, 0, D, 0, ff, (uint32_t)mode, 0, wg->tbl, wu->tbl,
                           mv ? k : 0, mv ? c->ids_off : k, mv ? c->w_off : c->list_off, mv ? 0 : c->items_off};
        memcpy(r->pc, pc, sizeof pc);
        if (inl) vk_pn_inline(c, r);
        vk_grid_fold(r, nblk, mv ? (uint32_t)n * k : c->max_items);
    }
    c->fuse_idx = -1;
}

/* expert down: the matrix-vector kernel sums each token's k experts itself; the matmul writes
   per-pair rows that a combine pass weights and sums */
static void vk_op_experts_down(void *be, int dst, const moe_weight *down, int n) {
    vk_ctx *c = be;
    const vk_wt *wd = vk_wt_of(c, down);
    if (!wd || c->err || n <= 0) return;
    vk_pn_touch(c, 0, 1u << dst);
    moe_vk_backend *vk = c->vk;
    uint32_t k = (uint32_t)c->route_k, ff = (uint32_t)down->ne[0], D = (uint32_t)down->ne[1];
    int td = vk_type_index(down->type), mv = n <= VK_MV_MAX;
    int mmk = vk->coopmat ? VKK_MMCM : VKK_MM;
    vk_rec *r = vk_rec_new(c, VKP_TYPED(mv ? VKK_MV : mmk, td), mv ? VKC_MV_DOWN : VKC_MM_DOWN);
    if (!r) return;
    vk_bind(r, 0, &c->h, 0);
    vk_bind(r, 1, mv ? &c->act[dst] : &c->p, 1);
    vk_bind(r, 2, &c->aux, 0);
    vk_bind(r, 3, &vk->tables, 0);
    r->wmode = 2;
    r->win = wd->win0;
    uint32_t nblk = vk_div_up(D, mv ? VK_MV_ROWS : 64);
    uint32_t pc[16] = {ff, D, (uint32_t)down->row_bytes, nblk, 0, ff, 0, D, 2, 0, wd->tbl, 0,
                       mv ? k : 0, mv ? c->ids_off : k, mv ? c->w_off : c->list_off, mv ? 0 : c->items_off};
    memcpy(r->pc, pc, sizeof pc);
    vk_grid_fold(r, nblk, mv ? (uint32_t)n : c->max_items);
    c->fuse_idx = -1;
    if (mv) {
        vk_mark_fusable(c, dst, n, 9);
        return;
    }
    r = vk_rec_new(c, VKP_MOE_COMBINE, VKC_COMBINE);
    if (!r) return;
    vk_bind(r, 0, &c->p, 0);
    vk_bind(r, 1, &c->act[dst], 1);
    vk_bind(r, 2, &c->aux, 0);
    uint32_t cpc[5] = {D, k, c->w_off, c->pos_off, 0};
    memcpy(r->pc, cpc, sizeof cpc);
    r->grid[0] = vk_div_up(D, k_vk_plain[VKP_MOE_COMBINE - VKP_ADD].wg);
    r->grid[1] = (uint32_t)n;
    r->grid[2] = 1;
    vk_mark_fusable(c, dst, n, 4);
}

/* device memory: weights (shared by the model's contexts), KV cache, scratch */
static void vk_stats(const void *be, moe_stats *out) {
    const vk_ctx *c = be;
    uint64_t s = c->h.size + c->p.size + c->aux.size + c->step.size + c->logits.size;
    for (int i = 0; i < c->n_rope; i++) s += c->rope[i].tab.size;
    for (int i = 0; i < ACT_COUNT; i++) s += c->act[i].size;
    out->gpu_bytes_weights += c->vk->weight_bytes + c->vk->tables.size;
    out->gpu_bytes_kv += c->kc.size + c->vc.size;
    out->gpu_bytes_scratch += s;
}

const moe_ops moe_vk_ops = {vk_op_embed, vk_op_rmsnorm, vk_op_matmul, vk_op_rope, vk_op_attention, vk_op_add, vk_op_route,
                            vk_op_experts_glu, vk_op_experts_down, vk_begin_step, vk_end_step, vk_read_logits, vk_kv_save,
                            vk_kv_load, vk_stats,
                            /* hybrid models (Gated DeltaNet): not on Vulkan yet (moe_vk_init refuses them) */
                            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};

